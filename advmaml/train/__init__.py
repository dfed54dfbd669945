"""Meta-training: the jitted meta-train step and the training loop (logging, validation, checkpoints, exact resume)."""
