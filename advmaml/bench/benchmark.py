"""Inner-loop and meta-step benchmarks: the library's real steps on synthetic data.

Each workload builds the same jitted meta-train step ``experiments.train``
uses (``make_train_step``) or the same evaluation call (``_evaluate_batch``),
on a synthetic uint8 class pool, and reports:

* compile time (lower + compile, excluded from throughput);
* throughput over ``repeats`` timed runs of ``min_steps`` steps or
  ``min_seconds`` seconds each, whichever comes first: median, min and max;
* FLOPs per step: the matmuls and convolutions of the traced step with every
  loop trip counted (``advmaml.bench.flops``), next to XLA's cost analysis of the
  compiled program (which counts each loop body once, so it undercounts steps
  with inner or attack loops), and the network's forward pass per image,
  counted from its trace the same way (any backbone) and, for the Conv4s,
  analytically;
* achieved GFLOP/s (from the trip-counted FLOPs) and the fraction of the
  machine's float32 matmul peak, measured by ``matmul_peak``;
* peak memory: the device's allocator peak where it reports one (GPU), else the
  compiled program's argument + output + temporary bytes (per device).

Workloads can be timed with their tasks split over ``num_devices`` devices,
through the same mesh ``experiments.train`` and ``experiments.evaluate`` use
(``advmaml.runtime.sharding``).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from advmaml.runtime import sharding
from advmaml.config import Config, preset
from advmaml.eval.evaluation import _evaluate_batch, clean_accuracy
from advmaml.bench.flops import jaxpr_flops
from advmaml.runtime.host import cpu_model
from advmaml.train.meta_step import init_train_state, make_train_step
from advmaml.objectives import get_objective
from advmaml.train.training import build_experiment, image_shape_of


@dataclasses.dataclass(frozen=True)
class Workload:
  name: str
  description: str
  overrides: dict
  kind: str = "train"      # "train": meta-steps/s; "adapt": tasks/s of test-time adaptation
  q_query: int = 5
  image_shape: tuple[int, ...] = (28, 28, 1)  # (H, W, C) of the synthetic class pool's images
  in_all: bool = True      # run by --all (the CPU speed study's B1-B4)

  def pool(self, classes: int = 64, examples: int = 20) -> jax.Array:
    """A synthetic uint8 class pool (classes, examples, H, W[, C]) of this workload's images."""
    h, w, c = self.image_shape
    shape = (classes, examples, h, w) + ((c,) if c > 1 else ())
    return jnp.asarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))


def _workloads() -> dict[str, Workload]:
  base = dict(n_way=5, k_shot=1, inner_lr=0.4, outer_lr=1e-3, first_order=False)
  out = {}
  for variant, suffix, filters in (("conv4_maxpool", "", 64), ("conv4", "-strided", 64)):
    net = dict(base, model=variant, filters=filters)
    out[f"B1{suffix}"] = Workload(f"B1{suffix}", f"5-way 1-shot, 5 queries/class, meta-batch 8, 1 step, {variant}",
                                  dict(net, meta_batch_size=8, inner_steps=1), q_query=5)
    out[f"B2{suffix}"] = Workload(f"B2{suffix}", f"5-way 1-shot, 15 queries/class, meta-batch 32, 1 step, {variant}",
                                  dict(net, meta_batch_size=32, inner_steps=1), q_query=15)
    out[f"B3{suffix}"] = Workload(f"B3{suffix}", f"B1 + adversarial querying, PGD-7 Linf eps 0.1 step 0.025, {variant}",
                                  dict(net, meta_batch_size=8, inner_steps=1, objective="aq",
                                       train_attack="pgd", train_epsilon=0.1, train_attack_steps=7,
                                       train_step_size=0.025, train_random_start=True), q_query=5)
    out[f"B4{suffix}"] = Workload(f"B4{suffix}", f"test-time adaptation: 32 tasks, 10 steps, 15 queries/class, {variant}",
                                  dict(net, meta_batch_size=32, eval_inner_steps=10), kind="adapt", q_query=15)
  # Mini-ImageNet-shaped: MetaOptNet's ResNet-12 at full width (12.4 M parameters),
  # second-order MAML, on 84x84 RGB images.
  out["B5"] = Workload("B5", "5-way 1-shot, 5 queries/class, meta-batch 2, 1 step, resnet12 "
                       "(64-160-320-640), 84x84x3",
                       dict(base, model="resnet12", filters=64, meta_batch_size=2, inner_steps=1,
                            inner_lr=0.01), q_query=5, image_shape=(84, 84, 3),
                       in_all=False)
  return out


WORKLOADS = _workloads()


def with_overrides(work: Workload, overrides: dict) -> Workload:
  """The workload with config fields replaced (e.g. conv_impl, remat, inner_steps)."""
  if work.kind == "adapt" and "inner_steps" in overrides:
    overrides = {**overrides, "eval_inner_steps": overrides["inner_steps"]}
  suffix = ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))
  return dataclasses.replace(work, name=f"{work.name}[{suffix}]",
                             overrides={**work.overrides, **overrides})


def conv4_forward_flops(cfg: Config, image_shape=(28, 28, 1)) -> int | None:
  """Analytic multiply-add FLOPs (x2) of one image through Conv4's convs and head (None: not a Conv4)."""
  if cfg.model not in ("conv4", "conv4_maxpool"):
    return None
  h, w, c = image_shape
  flops = 0
  for _ in range(4):
    stride = 2 if cfg.model == "conv4" else 1
    h, w = -(-h // stride), -(-w // stride)
    flops += 2 * h * w * 9 * c * cfg.filters
    c = cfg.filters
    if cfg.model == "conv4_maxpool":
      h, w = h // 2, w // 2
  return flops + 2 * h * w * c * cfg.n_way


def forward_flops(exp, image_shape) -> int:
  """FLOPs of one image (H, W, C) through the experiment's network, counted from its trace."""
  params = jax.eval_shape(exp.model.init, jax.random.key(0))
  return jaxpr_flops(jax.make_jaxpr(exp.model.apply)(params, jnp.zeros((1, *image_shape))))


def matmul_peak(size: int = 2048, repeats: int = 5, seconds: float = 1.0) -> dict:
  """Measured float32 matmul throughput (GFLOP/s) of the default device: median of repeats."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  rates = []
  for _ in range(repeats):
    n, t0 = 0, time.perf_counter()
    while True:
      f(a, b).block_until_ready()
      n += 1
      if time.perf_counter() - t0 >= seconds:
        break
    rates.append(2 * size ** 3 * n / (time.perf_counter() - t0) / 1e9)
  return {"gflops_median": statistics.median(rates), "gflops_min": min(rates),
          "gflops_max": max(rates), "size": size}


def _build(work: Workload, pool, num_devices: int = 1) -> tuple[Callable, tuple, Config]:
  """(jitted fn, its args, config) on images of ``pool`` (classes, examples, H, W[, C]);
  fn(*args) returns (new first arg, outputs).

  num_devices: workloads split their tasks over this many devices (0: all):
  training's meta-batch as ``experiments.train --num_devices`` does, test-time
  adaptation's episodes as ``evaluate_episodes`` with a mesh does. Raises
  ValueError naming the flag when the count is unavailable or does not divide
  the tasks.
  """
  cfg = preset("omniglot_5w1s").replace(**work.overrides)
  mesh = sharding.make_mesh(num_devices)
  sharding.check_divisible(cfg.meta_batch_size, mesh)
  exp = build_experiment(cfg, image_shape_of(pool), sharding.device_count(mesh))
  meta = exp.learner.init(jax.random.key(0))
  key = jax.random.key(1)
  pool = sharding.replicate(pool, mesh)
  if work.kind == "train":
    step = make_train_step(exp.learner, get_objective(cfg), exp.optimizer,
                           meta_batch_size=cfg.meta_batch_size, n_way=cfg.n_way,
                           k_shot=cfg.k_shot, q_query=work.q_query, mesh=mesh,
                           task_chunk=cfg.task_chunk)
    state = sharding.replicate(init_train_state(meta, exp.optimizer), mesh)
    return step, (state, pool, key), cfg
  fn = jax.jit(lambda m, p, k: (m, _evaluate_batch(
      m, p, k, 0, learner=exp.test_learner, metric_fn=clean_accuracy, n_way=cfg.n_way, k_shot=cfg.k_shot,
      q_query=work.q_query, batch_tasks=cfg.meta_batch_size, task_chunk=cfg.task_chunk,
      mesh=mesh)))
  return fn, (sharding.replicate(meta, mesh), pool, key), cfg


def _xla_flops(work: Workload, pool) -> float:
  """FLOPs per step by XLA's cost analysis of the same step with all tasks vmapped at once.

  The analysis counts a loop body once, so the task-chunked program (a scan over
  chunks) would be undercounted by the number of chunks; the all-at-once program
  does the same arithmetic. Inner-step and attack loops are still counted once:
  ``count_flops`` is the figure that counts them.
  """
  fn, args, _ = _build(dataclasses.replace(work, overrides={**work.overrides, "task_chunk": 0}),
                       pool)
  cost = fn.lower(*args).compile().cost_analysis() or {}
  if isinstance(cost, list):  # older JAX returned one dict per device
    cost = cost[0] if cost else {}
  return float(cost.get("flops", float("nan")))


def run_workload(work: Workload, *, repeats: int = 3, min_steps: int = 20,
                 min_seconds: float = 30.0, peak_gflops: float | None = None,
                 num_devices: int = 1) -> dict:
  """Compiles and times one workload; returns a JSON-ready dict.

  num_devices: see ``_build``. FLOPs per step are the whole step's (all
  devices); the fraction of peak divides by ``peak_gflops`` x the device count on
  accelerators, and by ``peak_gflops`` alone on CPU, where simulated host
  devices share the cores the peak was measured on.
  """
  pool = work.pool()
  fn, args, cfg = _build(work, pool, num_devices)
  devices = len(jax.devices()) if num_devices == 0 else num_devices
  t0 = time.perf_counter()
  traced = fn.trace(*args)  # traced once: compiled here, and its jaxpr counted below
  compiled = traced.lower().compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  xla_flops = _xla_flops(work, pool)
  flops = jaxpr_flops(traced.jaxpr)

  state, rest = args[0], args[1:]
  state, out = fn(state, *rest)  # first call: warm-up, off the clock
  jax.block_until_ready(out)
  rates = []
  for _ in range(repeats):
    n, t0 = 0, time.perf_counter()
    # min_steps steps or min_seconds, whichever comes first, but never fewer than 3 steps.
    while n < 3 or (n < min_steps and time.perf_counter() - t0 < min_seconds):
      state, out = fn(state, *rest)
      n += 1
      jax.block_until_ready(out)
    jax.block_until_ready(state)
    rates.append(n / (time.perf_counter() - t0))
  unit_per_step = cfg.meta_batch_size if work.kind == "adapt" else 1
  images = cfg.meta_batch_size * cfg.n_way * (cfg.k_shot + work.q_query)
  median = statistics.median(rates)
  stats = jax.devices()[0].memory_stats() or {}
  result = {
      "workload": work.name, "description": work.description, "num_devices": devices,
      "unit": "tasks/s" if work.kind == "adapt" else "meta-steps/s",
      "throughput_median": median * unit_per_step,
      "throughput_min": min(rates) * unit_per_step, "throughput_max": max(rates) * unit_per_step,
      "compile_s": compile_s, "repeats": repeats,
      "flops_per_step": flops,
      "flops_per_step_xla": xla_flops,
      "forward_flops_per_image": forward_flops(build_experiment(cfg, work.image_shape),
                                               work.image_shape),
      "forward_flops_per_image_analytic": conv4_forward_flops(cfg, work.image_shape),
      "images_per_step": images,
      "gflops_achieved": flops * median / 1e9,
      "peak_bytes": int(stats.get("peak_bytes_in_use", 0)) or int(
          mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes),
      "peak_bytes_source": "allocator" if "peak_bytes_in_use" in stats else "compiled program",
  }
  if peak_gflops:
    peak_devices = 1 if jax.devices()[0].platform == "cpu" else devices
    result["fraction_of_matmul_peak"] = result["gflops_achieved"] / (peak_gflops * peak_devices)
  result["config"] = {k: v for k, v in dataclasses.asdict(cfg).items()
                      if k in ("model", "filters", "kernels", "conv_impl", "batch_norm", "remat",
                               "inner_steps", "eval_inner_steps", "meta_batch_size", "objective",
                               "task_chunk")}
  return result


def machine_info() -> dict:
  dev = jax.devices()[0]
  return {"platform": dev.platform, "device": dev.device_kind, "device_count": jax.device_count(),
          "cpu_count": os.cpu_count(), "cpu_model": cpu_model(),
          "machine": platform.machine(), "jax": jax.__version__}
