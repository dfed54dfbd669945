"""The meta-training loop: config -> data -> jitted steps, with logging,
validation, checkpoints and exact resume.

Layout of a workdir::

    config.json            resolved config of the run
    metrics.jsonl          one JSON object per logged step (train, val)
    checkpoints/<step>/    state.pkl + metadata.json (see advmaml.checkpoint)

Restarting with the same workdir resumes from the newest good checkpoint and
continues as an uninterrupted run would: the step's key is derived from the
seed and the step number, and the optimizer state is saved with the params.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time

import jax
import numpy as np
import optax
from absl import logging

from advmaml import checkpoint, host, sharding
from advmaml.config import Config, ConfigError, validate, validate_against_data, with_legacy_defaults
from advmaml.data.sources import load_class_splits
from advmaml.evaluation import evaluate_episodes
from advmaml.maml import Learner
from advmaml.meta_step import TrainState, init_train_state, make_train_step
from advmaml.models import ModelSpec, make_model
from advmaml.objectives import get_objective

# Settings that may change when a run is resumed: they do not change the math
# (kernels: the same to float32 rounding).
RESUMABLE_CHANGES = ("num_steps", "log_every", "eval_every", "val_episodes", "checkpoint_every",
                     "keep_checkpoints", "test_episodes", "eval_batch_tasks", "data_dir",
                     "tfds_data_dir", "remat", "num_devices", "task_chunk", "kernels")


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything built from a config that training and evaluation share."""
  cfg: Config
  model: ModelSpec
  learner: Learner
  optimizer: optax.GradientTransformation


def build_experiment(cfg: Config, image_shape, num_devices: int = 1) -> Experiment:
  """The network, learner and optimizer of ``cfg`` for images of image_shape (H, W, C).

  num_devices: devices each step (or evaluation call) is split over; the CPU
  kernels size their image chunks for one device's share of the cores.
  """
  model = make_model(cfg.n_way, image_shape, cfg.filters, cfg.model, cfg.conv_impl,
                     kernels=cfg.kernels, cores_per_device=host.cores_per_device(num_devices))
  freeze_stats = model.freeze_batch_stats if cfg.batch_norm == "support" else None
  learner = Learner(model.apply, cfg.inner_steps, cfg.inner_lr, cfg.first_order,
                    cfg.meta_sgd, cfg.anil, model.head_names, cfg.remat, freeze_stats)
  return Experiment(cfg, model, learner, optax.adam(cfg.outer_lr))


def image_shape_of(pool) -> tuple[int, ...]:
  """(H, W, C) of the images in a class pool (C, D, H, W[, ch])."""
  shape = tuple(pool.shape[2:])
  return shape + (1,) if len(shape) == 2 else shape


def run_keys(seed: int):
  """Independent keys for init, training and validation, from one seed."""
  init_key, train_key, val_key = jax.random.split(jax.random.key(seed), 3)
  return init_key, train_key, val_key


def initial_state(exp: Experiment, seed: int) -> TrainState:
  params = exp.model.init(run_keys(seed)[0])
  return init_train_state(exp.learner.init_meta_params(params), exp.optimizer)


# -- checkpoints of TrainState as plain containers ----------------------------
def state_to_tree(state: TrainState, cfg: Config) -> dict:
  return {"step": int(state.step), "meta_params": jax.device_get(state.meta_params),
          "opt_state": list(jax.device_get(jax.tree.leaves(state.opt_state))),
          "config": dataclasses.asdict(cfg)}


def state_from_tree(tree: dict, template: TrainState, source: str) -> TrainState:
  """Rebuilds a TrainState from a loaded checkpoint, checking it fits the template."""
  try:
    leaves, treedef = jax.tree.flatten(template.opt_state)
    saved = tree["opt_state"]
    params_ok = jax.tree.structure(tree["meta_params"]) == jax.tree.structure(template.meta_params)
  except (KeyError, TypeError) as e:
    raise checkpoint.CheckpointError(f"{source}: not a training checkpoint ({e!r})") from e
  shapes_ok = params_ok and len(saved) == len(leaves) and all(
      np.shape(a) == np.shape(b) for a, b in zip(saved, leaves)) and all(
      np.shape(a) == np.shape(b) for a, b in zip(jax.tree.leaves(tree["meta_params"]),
                                                 jax.tree.leaves(template.meta_params)))
  if not shapes_ok:
    raise checkpoint.CheckpointError(
        f"{source}: parameter shapes do not match the config (different --n_way, --filters, "
        f"--model, --meta_sgd or --anil?); use the config the checkpoint was trained with")
  as_template = lambda x, t: jax.numpy.asarray(x, dtype=t.dtype)
  return TrainState(
      step=jax.numpy.asarray(tree["step"], jax.numpy.int32),
      meta_params=jax.tree.map(as_template, tree["meta_params"], template.meta_params),
      opt_state=jax.tree.unflatten(treedef, [as_template(x, t) for x, t in zip(saved, leaves)]))


# -- workdir files ------------------------------------------------------------
def atomic_write_text(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, path)


def check_or_write_config(workdir: pathlib.Path, cfg: Config) -> None:
  """Writes config.json, or checks a resumed run's config agrees with it."""
  path = workdir / "config.json"
  if path.exists():
    saved = with_legacy_defaults(json.loads(path.read_text()))
    current = dataclasses.asdict(cfg)
    diff = sorted(k for k in set(saved) | set(current)
                  if saved.get(k) != current.get(k) and k not in RESUMABLE_CHANGES)
    if diff:
      details = ", ".join(f"--{k}: saved {saved.get(k)!r} vs now {current.get(k)!r}" for k in diff)
      raise ConfigError(f"{path} was written by a run with other settings ({details}); "
                        "use a new --workdir, or the saved settings to resume")
  atomic_write_text(path, cfg.to_json() + "\n")


def truncate_metrics(path: pathlib.Path, last_step: int) -> None:
  """Drops metric lines past the resumed step, so a resumed log reads like an uninterrupted one."""
  if not path.exists():
    return
  kept = [line for line in path.read_text().splitlines()
          if line.strip() and json.loads(line).get("step", 0) <= last_step]
  atomic_write_text(path, "".join(line + "\n" for line in kept))


def append_metrics(path: pathlib.Path, record: dict) -> None:
  with path.open("a") as f:
    f.write(json.dumps(record) + "\n")


def _format_duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def train(cfg: Config, workdir: str | os.PathLike) -> dict:
  """Meta-trains (or resumes) a run in ``workdir``; returns the last logged metrics."""
  validate(cfg)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  splits = load_class_splits(cfg.dataset, data_dir=cfg.data_dir, split=cfg.split,
                             split_seed=cfg.split_seed, rotate=cfg.rotate,
                             image_size=cfg.image_size, tfds_data_dir=cfg.tfds_data_dir)
  validate_against_data(cfg, {name: s.images for name, s in splits.items()})
  try:
    mesh = sharding.make_mesh(cfg.num_devices)
    sharding.check_divisible(cfg.meta_batch_size, mesh)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  check_or_write_config(workdir, cfg)

  exp = build_experiment(cfg, image_shape_of(splits["train"].images), sharding.device_count(mesh))
  state = initial_state(exp, cfg.seed)
  ckpt_dir = workdir / "checkpoints"
  metrics_path = workdir / "metrics.jsonl"
  restored = checkpoint.restore_latest(ckpt_dir)
  if restored is not None:
    step, tree = restored
    state = state_from_tree(tree, state, str(ckpt_dir / str(step)))
    logging.info("Resumed from %s at step %d", ckpt_dir / str(step), step)
  step = int(state.step)
  truncate_metrics(metrics_path, step)

  _, train_key, val_key = run_keys(cfg.seed)
  state = sharding.replicate(state, mesh)
  train_pool = sharding.replicate(splits["train"].images, mesh)
  val_pool = jax.device_put(splits["val"].images)
  train_step = make_train_step(exp.learner, get_objective(cfg), exp.optimizer,
                               meta_batch_size=cfg.meta_batch_size, n_way=cfg.n_way,
                               k_shot=cfg.k_shot, q_query=cfg.q_query, mesh=mesh,
                               task_chunk=cfg.task_chunk)
  logging.info("Meta-batch of %d tasks split over %d %s device(s)", cfg.meta_batch_size,
               mesh.devices.size, mesh.devices.flat[0].platform)

  pending, last = [], {}
  start_step, t_start = step, time.time()
  t_last, step_last = t_start, step
  while step < cfg.num_steps:
    state, metrics = train_step(state, train_pool, train_key)
    step += 1
    pending.append(metrics)
    if step % cfg.log_every == 0 or step == cfg.num_steps:
      means = jax.tree.map(lambda *xs: float(np.mean(xs)), *jax.device_get(pending))
      pending = []
      now = time.time()
      rate = (step - step_last) / max(now - t_last, 1e-9)
      t_last, step_last = now, step
      last = {"step": step, "split": "train", **means, "steps_per_sec": rate}
      append_metrics(metrics_path, last)
      logging.info("step %d/%d | loss %.4f acc %.3f | %.2f steps/s | elapsed %s | left %s",
                   step, cfg.num_steps, means["loss"], means["accuracy"], rate,
                   _format_duration(now - t_start),
                   _format_duration((cfg.num_steps - step) / max(rate, 1e-9)))
    if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.num_steps):
      val = evaluate_episodes(exp.learner, state.meta_params, val_pool, val_key,
                              num_episodes=cfg.val_episodes, n_way=cfg.n_way, k_shot=cfg.k_shot,
                              q_query=cfg.eval_q_query, inner_steps=cfg.eval_inner_steps,
                              batch_tasks=cfg.eval_batch_tasks, mesh=mesh)
      record = {"step": step, "split": "val", "accuracy": val["accuracy"]["mean"],
                "ci95": val["accuracy"]["ci95"]}
      append_metrics(metrics_path, record)
      logging.info("step %d | val accuracy %.4f +- %.4f", step, record["accuracy"], record["ci95"])
    if step % cfg.checkpoint_every == 0 or step == cfg.num_steps:
      checkpoint.save_checkpoint(ckpt_dir, step, state_to_tree(state, cfg),
                                 keep=cfg.keep_checkpoints)
  if step > start_step:
    logging.info("Trained steps %d..%d in %s", start_step, step,
                 _format_duration(time.time() - t_start))
  return last
