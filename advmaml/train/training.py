"""The meta-training loop: config -> data -> jitted steps, with logging,
validation, checkpoints and exact resume.

Layout of a workdir: see advmaml.io.workdir (config.json, metrics.jsonl,
train.lock, checkpoints/<step>/).

Restarting with the same workdir resumes from the newest good checkpoint and
continues as an uninterrupted run would: the step's key is derived from the
seed and the step number, the optimizer state is saved with the params, and so
are the metrics of the steps not yet logged, so the log lines after a resume
are the ones an uninterrupted run writes (all but steps_per_sec, a wall-clock
rate).  A NaN or inf loss, gradient or parameter stops the run
(`DivergedError`) before anything non-finite is logged or saved.
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

from advmaml import optimizers
from advmaml.io import checkpoint
from advmaml.runtime import host, sharding
from advmaml.config import (LOCATION_FIELDS, Config, ConfigError, train_k_shot, validate,
                            validate_against_data, with_legacy_defaults)
from advmaml.data.sources import load_class_splits
from advmaml.eval.evaluation import evaluate_episodes
from advmaml.learners import FewShotLearner, make_learner
from advmaml.train.meta_step import TrainState, init_train_state, make_train_step
from advmaml.models import ModelSpec, make_model
from advmaml.objectives import get_objective
from advmaml.io.progress import format_duration
from advmaml.io.tensorboard_scalars import ScalarWriter
from advmaml.io.workdir import (METRICS_FILE, WorkdirLock, append_metrics, atomic_write_text,
                             prepare_workdir, truncate_metrics)

# Settings that may change when a run is resumed: they do not change the math
# (kernels: the same to float32 rounding).
RESUMABLE_CHANGES = ("num_steps", "log_every", "eval_every", "val_episodes", "checkpoint_every",
                     "keep_checkpoints", "test_episodes", "eval_batch_tasks", "remat",
                     "num_devices", "task_chunk", "kernels") + LOCATION_FIELDS


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything built from a config that training and evaluation share."""
  cfg: Config
  model: ModelSpec
  learner: FewShotLearner        # the meta-train step's ("train" phase)
  test_learner: FewShotLearner   # validation's and evaluation's ("test" phase)
  optimizer: optax.GradientTransformation   # the outer one, on the learner's meta-parameters


def build_experiment(cfg: Config, image_shape, num_devices: int = 1) -> Experiment:
  """The network, learners and outer optimizer of ``cfg`` for images of image_shape (H, W, C).

  num_devices: devices each step (or evaluation call) is split over; the CPU
  kernels size their image chunks for one device's share of the cores.
  """
  model = make_model(cfg.n_way, image_shape, cfg.filters, cfg.model, cfg.conv_impl,
                     kernels=cfg.kernels, cores_per_device=host.cores_per_device(num_devices))
  return Experiment(cfg, model, make_learner(cfg, model, phase="train"),
                    make_learner(cfg, model, phase="test"),
                    optimizers.outer_optimizer(cfg.outer_optimizer, cfg.outer_lr))


def image_shape_of(pool) -> tuple[int, ...]:
  """(H, W, C) of the images in a class pool (C, D, H, W[, ch])."""
  shape = tuple(pool.shape[2:])
  return shape + (1,) if len(shape) == 2 else shape


def run_keys(seed: int):
  """Independent keys for init, training and validation, from one seed."""
  init_key, train_key, val_key = jax.random.split(jax.random.key(seed), 3)
  return init_key, train_key, val_key


def initial_state(exp: Experiment, seed: int) -> TrainState:
  return init_train_state(exp.learner.init(run_keys(seed)[0]), exp.optimizer)


# -- checkpoints of TrainState as plain containers ----------------------------
def _stack_pending(pending: list[dict]) -> dict:
  """Per-step metrics since the last log line, as {name: (steps,) float32}."""
  if not pending:
    return {}
  return {k: np.stack([np.asarray(m[k]) for m in pending]) for k in pending[0]}


def _unstack_pending(stacked: dict) -> list[dict]:
  lengths = {len(v) for v in stacked.values()}
  return [{k: v[i] for k, v in stacked.items()} for i in range(lengths.pop() if lengths else 0)]


def state_to_tree(state: TrainState, cfg: Config, pending: list[dict] = ()) -> dict:
  """The checkpoint tree. ``pending``: host metrics of the steps not yet logged,
  so that a resumed run averages the same window as an uninterrupted one."""
  return {"step": int(state.step), "meta_params": jax.device_get(state.meta_params),
          "opt_state": list(jax.device_get(jax.tree.leaves(state.opt_state))),
          "config": dataclasses.asdict(cfg), "pending_metrics": _stack_pending(list(pending))}


def _all_finite(tree) -> bool:
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.inexact))


def state_from_tree(tree: dict, template: TrainState, source: str) -> TrainState:
  """Rebuilds a TrainState from a loaded checkpoint, checking it fits the template.

  Raises CheckpointError (so `checkpoint.restore_latest` falls back to an
  earlier step) for a tree that is not a training checkpoint, has other
  shapes than the config's network, or holds NaN/inf.
  """
  try:
    leaves, treedef = jax.tree.flatten(template.opt_state)
    saved = tree["opt_state"]
    step = tree["step"]
    params_ok = jax.tree.structure(tree["meta_params"]) == jax.tree.structure(template.meta_params)
    saved_leaves = list(saved)
  except (KeyError, TypeError) as e:
    raise checkpoint.CheckpointError(f"{source}: not a training checkpoint (missing or bad "
                                     f"entry {e}); delete it to resume from an earlier step") from None
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
    raise checkpoint.CheckpointError(f"{source}: its step {step!r} is not a step number; "
                                     "delete it to resume from an earlier step")
  shapes_ok = params_ok and len(saved_leaves) == len(leaves) and all(
      np.shape(a) == np.shape(b) for a, b in zip(saved_leaves, leaves)) and all(
      np.shape(a) == np.shape(b) for a, b in zip(jax.tree.leaves(tree["meta_params"]),
                                                 jax.tree.leaves(template.meta_params)))
  if not shapes_ok:
    raise checkpoint.CheckpointError(
        f"{source}: parameter shapes do not match the config (different --n_way, --filters, "
        f"--model, --meta_sgd or --anil?); use the config the checkpoint was trained with")
  if not (_all_finite(tree["meta_params"]) and _all_finite(saved_leaves)):
    raise checkpoint.CheckpointError(f"{source}: holds NaN or inf parameters (the run "
                                     "diverged); use an earlier step")
  as_template = lambda x, t: jax.numpy.asarray(x, dtype=t.dtype)
  return TrainState(
      step=jax.numpy.asarray(step, jax.numpy.int32),
      meta_params=jax.tree.map(as_template, tree["meta_params"], template.meta_params),
      opt_state=jax.tree.unflatten(treedef, [as_template(x, t) for x, t in zip(saved_leaves, leaves)]))


def _pending_from_tree(tree: dict, source: str) -> list[dict]:
  """The unlogged per-step metrics of a checkpoint (none in checkpoints before 2026-12-01)."""
  stacked = tree.get("pending_metrics", {})
  if not isinstance(stacked, dict) or any(np.ndim(v) != 1 for v in stacked.values()) or len(
      {len(v) for v in stacked.values()}) > 1:
    raise checkpoint.CheckpointError(f"{source}: bad pending_metrics entry; delete it to "
                                     "resume from an earlier step")
  return _unstack_pending(stacked)


# -- workdir files ------------------------------------------------------------
def _refuse_other_settings(where: str, saved: dict, cfg: Config) -> None:
  """ConfigError if ``saved`` (a config dict) differs from ``cfg`` in a setting that changes the math."""
  saved = with_legacy_defaults(saved)
  current = dataclasses.asdict(cfg)
  diff = sorted(k for k in set(saved) | set(current)
                if saved.get(k) != current.get(k) and k not in RESUMABLE_CHANGES)
  if diff:
    details = ", ".join(f"--{k}: saved {saved.get(k)!r} vs now {getattr(cfg, k, None)!r}"
                        for k in diff)
    raise ConfigError(f"{where} was written by a run with other settings ({details}); "
                      "use a new --workdir, or the saved settings to resume")


def check_saved_config(workdir: pathlib.Path, cfg: Config) -> None:
  """Refuses to resume a workdir whose config.json has other (non-resumable) settings."""
  path = workdir / "config.json"
  if not path.exists():
    return
  try:
    saved = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(saved, dict):
      raise ValueError("not a JSON object")
  except (ValueError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path} is not a readable config ({e}); restore it, or delete it to "
                      "resume from the settings stored in the checkpoints") from None
  _refuse_other_settings(str(path), saved, cfg)


class DivergedError(Exception):
  """A non-finite loss, gradient or parameter stopped the run; the message names the step."""


def _check_finite(pending: list[dict], first_step: int, last_ckpt: str, cfg: Config) -> None:
  """Raises DivergedError at the first of the pending steps with a NaN/inf metric."""
  for i, metrics in enumerate(pending):
    bad = {k: float(v) for k, v in metrics.items() if not np.isfinite(v)}
    if bad:
      shown = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
      raise DivergedError(
          f"step {first_step + i}: non-finite training metrics ({shown}); stopped. The last "
          f"checkpoint, all finite, is {last_ckpt}. Rerunning would diverge again at the same "
          f"step: start a new --workdir with a lower --outer_lr (now {cfg.outer_lr}) or "
          f"--inner_lr (now {cfg.inner_lr})")


def train(cfg: Config, workdir: str | os.PathLike, *, trust_unverified: bool = False,
          tensorboard: bool = True) -> dict:
  """Meta-trains (or resumes) a run in ``workdir``; returns the last logged metrics.

  tensorboard: also write the logged metrics as TensorBoard scalars in
  ``<workdir>/tensorboard/`` (``advmaml.io.tensorboard_scalars``).

  One process at a time may train in a workdir (`workdir.WorkdirLock`).
  Nothing in the workdir is written before the settings, the data and the
  checkpoint to resume from have been checked.
  """
  validate(cfg)
  workdir = prepare_workdir(workdir)
  with WorkdirLock(workdir):
    return _train_locked(cfg, workdir, trust_unverified, tensorboard)


def _inner_lr(cfg: Config, meta_params: dict) -> float:
  """The inner learning rate: the configured one, or the mean of Meta-SGD's learned ones."""
  if not cfg.meta_sgd:
    return cfg.inner_lr
  leaves = jax.device_get(jax.tree.leaves(meta_params["inner_lr"]))
  return float(sum(np.sum(x) for x in leaves) / sum(np.size(x) for x in leaves))


def _train_locked(cfg: Config, workdir: pathlib.Path, trust_unverified: bool,
                  tensorboard: bool) -> dict:
  splits = load_class_splits(cfg.dataset, data_dir=cfg.data_dir, split=cfg.split,
                             split_seed=cfg.split_seed, rotate=cfg.rotate,
                             image_size=cfg.image_size, tfds_data_dir=cfg.tfds_data_dir)
  validate_against_data(cfg, {name: s.images for name, s in splits.items()})
  try:
    devices = cfg.num_devices or sharding.dividing_device_count(cfg.meta_batch_size)
    mesh = sharding.make_mesh(devices)
    sharding.check_divisible(cfg.meta_batch_size, mesh)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if mesh.devices.size < jax.device_count():
    logging.info("--meta_batch_size=%d does not split over all %d devices: using %d "
                 "(--num_devices chooses)", cfg.meta_batch_size, jax.device_count(),
                 mesh.devices.size)
  check_saved_config(workdir, cfg)

  exp = build_experiment(cfg, image_shape_of(splits["train"].images), sharding.device_count(mesh))
  state = initial_state(exp, cfg.seed)
  ckpt_dir = workdir / "checkpoints"
  metrics_path = workdir / METRICS_FILE

  def parse(step, tree):
    source = str(ckpt_dir / str(step))
    if isinstance(tree, dict) and isinstance(tree.get("config"), dict):
      # Another run's settings are a wrong command, not a bad checkpoint: refused
      # (ConfigError), not skipped. This also covers a workdir whose config.json is gone.
      _refuse_other_settings(f"the checkpoint {source}", tree["config"], cfg)
    return state_from_tree(tree, state, source), _pending_from_tree(tree, source)

  restored = checkpoint.restore_latest(ckpt_dir, parse, trust_unverified=trust_unverified)
  pending, last_ckpt = [], "none (the run starts from its initialisation)"
  if restored is not None:
    step, (state, pending) = restored
    last_ckpt = str(ckpt_dir / str(step))
    logging.info("Resumed from %s at step %d", ckpt_dir / str(step), step)
  step = int(state.step)
  # Validation passed: only now is anything in the workdir (re)written.
  atomic_write_text(workdir / "config.json", cfg.to_json() + "\n")
  truncate_metrics(metrics_path, step)
  # Every write is flushed, so a run that raises keeps its points without a close.
  scalars = ScalarWriter(workdir, step, enabled=tensorboard)

  _, train_key, val_key = run_keys(cfg.seed)
  state = sharding.replicate(state, mesh)
  train_pool = sharding.replicate(splits["train"].images, mesh)
  val_pool = jax.device_put(splits["val"].images)
  train_step = make_train_step(exp.learner, get_objective(cfg), exp.optimizer,
                               meta_batch_size=cfg.meta_batch_size, n_way=cfg.n_way,
                               k_shot=train_k_shot(cfg), q_query=cfg.q_query, mesh=mesh,
                               task_chunk=cfg.task_chunk)
  logging.info("Meta-batch of %d tasks split over %d %s device(s)", cfg.meta_batch_size,
               mesh.devices.size, mesh.devices.flat[0].platform)

  # XLA:CPU's simulated host devices abort the process in the step's cross-device
  # all-reduce ("Termination timeout ... rendezvous", after 40 s) when several steps
  # are queued: seen on 2 cores within 50-200 steps of omniglot_5w1s. Waiting for each
  # step first fixed it (1,500 steps, 11.8 steps/s, as fast as with the queue).
  wait_each_step = mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"
  last = {}
  start_step, t_start = step, time.time()
  t_last, step_last = t_start, step
  checked = len(pending)   # pending[:checked] are host values already found finite
  while step < cfg.num_steps:
    state, metrics = train_step(state, train_pool, train_key)
    if wait_each_step:
      jax.block_until_ready(state.step)
    step += 1
    pending.append(metrics)
    log_now = step % cfg.log_every == 0 or step == cfg.num_steps
    eval_now = cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.num_steps)
    save_now = step % cfg.checkpoint_every == 0 or step == cfg.num_steps
    if not (log_now or eval_now or save_now):
      continue
    # One host transfer per log/eval/checkpoint, not per step; nothing non-finite
    # is logged, evaluated or saved.
    pending[checked:] = jax.device_get(pending[checked:])
    _check_finite(pending[checked:], step - len(pending) + checked + 1, last_ckpt, cfg)
    checked = len(pending)
    if log_now:
      means = jax.tree.map(lambda *xs: float(np.mean(xs)), *pending)
      pending, checked = [], 0
      now = time.time()
      rate = (step - step_last) / max(now - t_last, 1e-9)
      t_last, step_last = now, step
      last = {"step": step, "split": "train", **means, "steps_per_sec": rate}
      append_metrics(metrics_path, last)
      scalars.write(last, outer_lr=cfg.outer_lr, inner_lr=_inner_lr(cfg, state.meta_params))
      logging.info("step %d/%d | loss %.4f acc %.3f | %.2f steps/s | elapsed %s | left %s",
                   step, cfg.num_steps, means["loss"], means["accuracy"], rate,
                   format_duration(now - t_start),
                   format_duration((cfg.num_steps - step) / max(rate, 1e-9)))
    if eval_now:
      val = evaluate_episodes(exp.test_learner, state.meta_params, val_pool, val_key,
                              num_episodes=cfg.val_episodes, n_way=cfg.n_way, k_shot=cfg.k_shot,
                              q_query=cfg.eval_q_query, batch_tasks=cfg.eval_batch_tasks, mesh=mesh)
      record = {"step": step, "split": "val", "accuracy": val["accuracy"]["mean"],
                "ci95": val["accuracy"]["ci95"]}
      append_metrics(metrics_path, record)
      scalars.write(record)
      logging.info("step %d | val accuracy %.4f +- %.4f", step, record["accuracy"], record["ci95"])
    if save_now:
      tree = state_to_tree(state, cfg, pending)
      if not (_all_finite(tree["meta_params"]) and _all_finite(tree["opt_state"])):
        raise DivergedError(
            f"step {step}: the parameters are no longer finite (the update overflowed); "
            f"stopped without saving. The last checkpoint, all finite, is {last_ckpt}. Start "
            f"a new --workdir with a lower --outer_lr (now {cfg.outer_lr})")
      last_ckpt = str(checkpoint.save_checkpoint(ckpt_dir, step, tree, keep=cfg.keep_checkpoints))
  scalars.close()
  if step > start_step:
    logging.info("Trained steps %d..%d in %s", start_step, step,
                 format_duration(time.time() - t_start))
  return last
