"""Loading a trained run (workdir or checkpoint) and evaluating it on a split."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax
from absl import logging
from jax.sharding import Mesh

import advmaml
from advmaml.io import checkpoint, partial_results
from advmaml.runtime import sharding
from advmaml.config import LOCATION_FIELDS, Config, ConfigError, validate_against_data
from advmaml.data.sources import load_class_splits
from advmaml.eval.evaluation import evaluate_episodes, evaluation_episode
from advmaml.train.training import Experiment, build_experiment, initial_state, state_from_tree
from advmaml.io.workdir import atomic_write_text


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  cfg: Config
  exp: Experiment
  meta_params: dict
  step: int
  source: str        # checkpoint folder it came from


def _run_from_tree(tree, source: str, data_dir: str | None) -> TrainedRun:
  """The network and meta-parameters of one loaded checkpoint (CheckpointError if unusable)."""
  if not isinstance(tree, dict) or not isinstance(tree.get("config"), dict):
    raise checkpoint.CheckpointError(f"{source}: holds no config; not an advmaml training checkpoint")
  try:
    cfg = Config.from_dict(tree["config"])
  except (ConfigError, TypeError) as e:
    raise checkpoint.CheckpointError(f"{source}: its config is not one this advmaml knows "
                                     f"({e}); use the advmaml version that wrote it") from None
  if data_dir is not None:
    cfg = cfg.replace(data_dir=data_dir)
  exp = build_experiment(cfg, image_shape_for(cfg))
  state = state_from_tree(tree, initial_state(exp, cfg.seed), source)
  return TrainedRun(cfg, exp, state.meta_params, int(state.step), source)


def test_learner(cfg: Config, *, inner_steps: int | None = None, num_devices: int = 1):
  """The learner as evaluated: ``cfg``'s "test" phase, optionally with other
  adaptation steps (``inner_steps`` replaces ``eval_inner_steps``), its kernels
  sized for ``num_devices`` devices' share of the cores."""
  if inner_steps is not None:
    cfg = cfg.replace(eval_inner_steps=inner_steps)
  return build_experiment(cfg, image_shape_for(cfg), num_devices).test_learner


def image_shape_for(cfg: Config) -> tuple[int, int, int]:
  """(H, W, C) of the dataset's images: grayscale Omniglot, RGB otherwise."""
  channels = 1 if cfg.dataset.startswith("omniglot") else 3
  return (cfg.image_size, cfg.image_size, channels)


def load_checkpointed_run(path: str | os.PathLike, data_dir: str | None = None, *,
                          trust_unverified: bool = False) -> TrainedRun:
  """Loads the newest usable checkpoint under ``path`` and rebuilds its network.

  ``path``: a workdir, its checkpoints/ folder, a step folder or a state.pkl.
  The config stored in the checkpoint decides the network, so a model is
  always evaluated as it was trained. A checkpoint that does not load, does
  not fit its config or holds NaN/inf is skipped with a warning (in a
  workdir) or refused (a single step). No data is read.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist; pass a training --workdir or a checkpoint folder")
  for ckpt_dir in (path / "checkpoints", path):
    if ckpt_dir.is_dir() and checkpoint.list_checkpoints(ckpt_dir):
      parse = lambda step, tree: _run_from_tree(tree, str(ckpt_dir / str(step)), data_dir)
      return checkpoint.restore_latest(ckpt_dir, parse, trust_unverified=trust_unverified)[1]
  _, tree = checkpoint.load_checkpoint(path, trust_unverified=trust_unverified)
  return _run_from_tree(tree, str(path), data_dir)


def load_trained(path: str | os.PathLike, data_dir: str | None = None, *,
                 trust_unverified: bool = False) -> tuple[TrainedRun, dict]:
  """The newest good checkpoint under ``path`` and the class splits of the protocol it was trained on."""
  run = load_checkpointed_run(path, data_dir, trust_unverified=trust_unverified)
  cfg = run.cfg
  splits = load_class_splits(cfg.dataset, data_dir=cfg.data_dir, split=cfg.split,
                             split_seed=cfg.split_seed, rotate=cfg.rotate,
                             image_size=cfg.image_size, tfds_data_dir=cfg.tfds_data_dir)
  return run, splits


def evaluation_mesh(num_devices: int, what: str = "Evaluation episodes") -> Mesh:
  """The "tasks" mesh of --num_devices (0: all local devices), logged; ConfigError if too many."""
  try:
    mesh = sharding.make_mesh(num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  logging.info("%s split over %d %s device(s)", what, mesh.devices.size,
               mesh.devices.flat[0].platform)
  return mesh


def config_identity(cfg: Config) -> dict:
  """The config fields that decide an evaluation's numbers (all but the data folders)."""
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in LOCATION_FIELDS}


def evaluate_trained(run: TrainedRun, splits: dict, *, split: str = "test", num_episodes: int | None = None,
                     seed: int = 0, inner_steps: int | None = None, metric_fn=None,
                     num_devices: int = 0, metric_params=None, partial_path=None,
                     settings: str = "") -> dict:
  """Mean accuracy (and any other per-episode metric) with 95% intervals on ``split``.

  metric_params: the pytree ``metric_fn`` gets as its meta_params (default
  ``run.meta_params``; the masking checks pass (target, surrogate)).
  num_devices: devices each call's episodes are split over (0: all local ones);
  the results do not depend on it. partial_path: keeps the finished episodes
  there and resumes from them (``evaluate_episodes``); the evaluation's
  identity is ``settings`` (the caller's description of metric_fn: its flags),
  the split, seed, inner steps, config (less the data folders' paths), and digests
  of the parameters evaluated, the data and the advmaml sources, so that only the
  same evaluation of the same checkpoint by the same code resumes, wherever the
  files lie.
  """
  cfg = run.cfg
  if split not in splits:
    raise ConfigError(f"--split={split!r}; choose one of {sorted(splits)}")
  mesh = evaluation_mesh(num_devices)
  validate_against_data(cfg, {split: splits[split].images})
  num_episodes = cfg.test_episodes if num_episodes is None else num_episodes
  inner_steps = cfg.eval_inner_steps if inner_steps is None else inner_steps
  first, _ = evaluation_episode(jax.numpy.asarray(splits[split].images), jax.random.key(seed), 0,
                                cfg.n_way, cfg.k_shot, cfg.eval_q_query)
  # The same network with its kernels sized for this layout's share of the cores per device.
  learner = test_learner(cfg, inner_steps=inner_steps, num_devices=sharding.device_count(mesh))
  check_outputs_finite(run, first, learner)
  params = run.meta_params if metric_params is None else metric_params
  identity = ""
  if partial_path is not None:
    identity = json.dumps({
        "settings": settings, "split": split, "seed": seed, "inner_steps": inner_steps,
        "config": config_identity(cfg), "params": partial_results.tree_digest(params),
        "pool": partial_results.tree_digest(splits[split].images),
        "code": partial_results.source_digest(advmaml)}, sort_keys=True, default=str)
  results = evaluate_episodes(
      learner, params, splits[split].images, jax.random.key(seed),
      num_episodes=num_episodes, n_way=cfg.n_way, k_shot=cfg.k_shot, q_query=cfg.eval_q_query,
      batch_tasks=cfg.eval_batch_tasks, metric_fn=metric_fn, mesh=mesh,
      partial_path=partial_path, identity=identity)
  return {"checkpoint": run.source, "step": run.step, "split": split, "protocol": cfg.split,
          "num_episodes": num_episodes, "seed": seed, "inner_steps": inner_steps,
          "n_way": cfg.n_way, "k_shot": cfg.k_shot, "q_query": cfg.eval_q_query,
          "metrics": results}


def check_outputs_finite(run: TrainedRun, episode, learner=None) -> None:
  """Refuses a model whose adapted logits on ``episode`` hold NaN/inf.

  Finite but huge parameters (a run that diverged after its last finite
  checkpoint) give NaN logits, whose argmax is a constant class: evaluation
  would report chance accuracy with a zero-width interval as if it meant
  something. episode: one Episode (support_x (S, H, W, C) float in [0, 1], ...).
  learner: the learner as evaluated (default ``run.exp.test_learner``).
  """
  learner = run.exp.test_learner if learner is None else learner

  @jax.jit
  def logits(meta_params, episode):
    state = learner.adapt(meta_params, episode.support_x, episode.support_y, jax.random.key(0))
    return learner.logits(state, episode.query_x)
  if not bool(jax.numpy.isfinite(logits(run.meta_params, episode)).all()):
    raise checkpoint.CheckpointError(
        f"{run.source}: the model's logits are NaN or inf after adapting on an evaluation "
        "episode (its parameters overflow: the run diverged); evaluate an earlier checkpoint")


def write_json(path: str | os.PathLike, record: dict) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
