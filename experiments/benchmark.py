r"""Benchmark the library's meta-train and adaptation steps on synthetic data.

  python -m experiments.benchmark --config=B1          # one workload
  python -m experiments.benchmark --all                # B1..B4, max-pool and strided Conv4
  python -m experiments.benchmark --config=B5          # ResNet-12, 84x84 (not in --all)
  python -m experiments.benchmark --all --output=results/benchmarks/cpu-2core.json
  python -m experiments.benchmark --config=B1,B2 --num_devices=1,2,4,8   # scaling over GPUs

Prints one line per workload and writes JSON with the machine, the measured
float32 matmul peak and, per workload, median/min/max throughput, compile
time, FLOPs per step, achieved GFLOP/s, fraction of peak and peak memory.
"""

# First, before anything imports JAX: the host device count is fixed when JAX starts.
from advmaml.runtime import host
HOST_DEVICES = host.use_all_cpu_cores()

import json
import pathlib

from absl import app, flags, logging

from advmaml.bench import benchmark
from advmaml.runtime import sharding
from advmaml.kernels import CONV_IMPLS, KERNELS
from advmaml.io.progress import Progress
from advmaml.eval.trained_runs import write_json
from experiments import malloc_flag

CONFIG = flags.DEFINE_list("config", [], f"Workloads to run, from {sorted(benchmark.WORKLOADS)}.")
ALL = flags.DEFINE_bool("all", False, "Run every workload but B5 (ResNet-12).")
REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions per workload.")
MIN_STEPS = flags.DEFINE_integer("min_steps", 20, "Steps per repetition (or --min_seconds, whichever first).")
MIN_SECONDS = flags.DEFINE_float("min_seconds", 30.0, "Seconds per repetition (or --min_steps, whichever first).")
OUTPUT = flags.DEFINE_string("output", None, "JSON output path (default: print only).")
KERNELS_FLAG = flags.DEFINE_enum("kernels", None, list(KERNELS),
                                 "Override the workloads' kernel set (default auto).")
CONV_IMPL = flags.DEFINE_enum("conv_impl", None, list(CONV_IMPLS),
                              "Override the cpu kernels' convolution (default im2col).")
REMAT = flags.DEFINE_bool("remat", None, "Override the workloads' inner-loop rematerialisation.")
INNER_STEPS = flags.DEFINE_integer("inner_steps", None, "Override the workloads' inner steps.")
TASK_CHUNK = flags.DEFINE_integer("task_chunk", None, "Override the tasks differentiated together "
                                  "(train workloads; 0: the whole meta-batch).")
NUM_DEVICES = flags.DEFINE_list(
    "num_devices", ["1"], "Device counts to time each workload on, its tasks split over them "
    "as in experiments.train and experiments.evaluate (e.g. 1,2,4,8; 0: all).")
TRAIN_ATTACK_BEST = flags.DEFINE_bool(
    "train_attack_best", None, "Override B3's training attack: keep each example's strongest "
    "iterate (the rule before 2026-11-29) instead of PGD's last iterate.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  keep_freed_memory = malloc_flag.apply()
  logging.info(HOST_DEVICES)
  names = (sorted(n for n, w in benchmark.WORKLOADS.items() if w.in_all) if ALL.value
           else CONFIG.value)
  unknown = [n for n in names if n not in benchmark.WORKLOADS]
  if unknown or not names:
    raise app.UsageError(f"--config: unknown or empty {unknown or names}; choose from "
                         f"{sorted(benchmark.WORKLOADS)} or pass --all")
  if REPEATS.value < 1 or MIN_STEPS.value < 1 or MIN_SECONDS.value <= 0:
    raise app.UsageError("--repeats, --min_steps and --min_seconds must be positive")
  try:
    device_counts = [int(n) for n in NUM_DEVICES.value]
  except ValueError:
    raise app.UsageError(f"--num_devices={','.join(NUM_DEVICES.value)}: give integers, "
                         "e.g. 1,2,4") from None
  if not device_counts:
    raise app.UsageError("--num_devices is empty; e.g. --num_devices=1")
  # The checks _build makes, here before any timing rather than minutes in.
  try:
    meshes = [sharding.make_mesh(n) for n in device_counts]
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  for name in names:
    work = benchmark.WORKLOADS[name]
    for mesh in meshes:
      try:
        sharding.check_divisible(work.overrides["meta_batch_size"], mesh)
      except ValueError as e:
        raise app.UsageError(f"{name}: {e}") from None
  peak = benchmark.matmul_peak()
  logging.info("float32 matmul peak: %.1f GFLOP/s (median; %.1f-%.1f)", peak["gflops_median"],
               peak["gflops_min"], peak["gflops_max"])
  overrides = {k: v for k, v in (("kernels", KERNELS_FLAG.value),
                                    ("conv_impl", CONV_IMPL.value), ("remat", REMAT.value),
                                    ("inner_steps", INNER_STEPS.value),
                                    ("task_chunk", TASK_CHUNK.value),
                                    ("train_attack_best", TRAIN_ATTACK_BEST.value)) if v is not None}
  results = []
  progress = Progress("benchmark", len(names) * len(device_counts), "workloads", every_seconds=0)
  for name in names:
    work = benchmark.WORKLOADS[name]
    if overrides:
      work = benchmark.with_overrides(work, overrides)
    for count in device_counts:
      r = benchmark.run_workload(work, repeats=REPEATS.value, min_steps=MIN_STEPS.value,
                                 min_seconds=MIN_SECONDS.value,
                                 peak_gflops=peak["gflops_median"], num_devices=count)
      results.append(r)
      devices = f" x{r['num_devices']}dev" if r["num_devices"] != 1 else ""
      print(f"{r['workload'] + devices:<12} {r['throughput_median']:8.2f} {r['unit']:<12} "
            f"[{r['throughput_min']:.2f}-{r['throughput_max']:.2f}]  compile {r['compile_s']:5.1f}s  "
            f"{r['gflops_achieved']:6.1f} GFLOP/s ({100 * r['fraction_of_matmul_peak']:.0f}% of peak)  "
            f"mem {r['peak_bytes'] / 2**20:.0f} MiB", flush=True)
      progress.update(len(results))
  record = {"machine": benchmark.machine_info(), "matmul_peak": peak, "workloads": results,
            "settings": {"repeats": REPEATS.value, "min_steps": MIN_STEPS.value,
                         "min_seconds": MIN_SECONDS.value, "overrides": overrides,
                         "keep_freed_memory": keep_freed_memory,
                         "num_devices": device_counts}}
  if OUTPUT.value:
    write_json(pathlib.Path(OUTPUT.value), record)
    logging.info("written to %s", OUTPUT.value)
  else:
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
  app.run(main)
