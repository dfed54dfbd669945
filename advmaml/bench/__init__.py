"""The benchmark harness (apart from the hot path): workloads, timing, FLOP counts."""
