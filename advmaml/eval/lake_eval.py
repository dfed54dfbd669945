"""Lake et al. (2015)'s one-shot classification runs, scored with a trained meta-learner.

For each of the 20 runs the model adapts on the 20 training images (one per
class) and classifies the 20 test items; the result is the error rate per run
and its mean, as Lake et al. report it, optionally under attack with the same
per-episode metric functions as ``experiments.evaluate``.

The runs are drawn from Omniglot's evaluation alphabets, so only a model
meta-trained on the background alphabets (``--split=lake``) may be scored.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh

from advmaml.runtime import sharding
from advmaml.config import ConfigError
from advmaml.data.episodes import Episode
from advmaml.data.lake_runs import NUM_CLASSES
from advmaml.eval.evaluation import clean_accuracy, map_over_devices, mean_and_ci95
from advmaml.train.meta_step import AUTO_TASK_CHUNK, resolve_task_chunk
from advmaml.io.progress import Progress


def check_model_fits_lake(cfg) -> None:
  """Refuses models whose training saw the evaluation alphabets, or that are not 20-way."""
  if cfg.dataset != "omniglot" or cfg.split != "lake":
    raise ConfigError(
        f"this model was trained with --dataset={cfg.dataset} --split={cfg.split}; Lake's runs come "
        "from the evaluation alphabets, which that split trains on. Train with --split=lake "
        "(background alphabets only) to score the one-shot runs")
  if cfg.n_way != NUM_CLASSES:
    raise ConfigError(f"this model is {cfg.n_way}-way but Lake's runs are {NUM_CLASSES}-way; "
                      f"train with --n_way={NUM_CLASSES}")


@functools.partial(jax.jit, static_argnames=("learner", "metric_fn", "mesh"))
def _score_runs(meta_params, episodes: Episode, key, start, *, learner, metric_fn, mesh=None):
  """Metrics of runs ``start .. start + n - 1``, given as ``episodes`` (n, 20, ...): {name: (n,)}.

  Run i's metric key is ``fold_in(key, i)`` wherever and with whatever others it runs.
  """
  def one(x, shared):
    (i, episode), (meta_params, key) = x, shared
    return metric_fn(learner, meta_params, episode, jax.random.fold_in(key, i))
  indices = start + jnp.arange(episodes.support_y.shape[0])
  return map_over_devices(one, (indices, episodes), (meta_params, key), mesh=mesh)


def runs_per_call(num_runs: int, devices: int) -> int:
  """Runs scored by one jitted call: one per device on CPU, where each device scores its
  runs one at a time anyway (so a call per block costs no speed and gives progress
  lines), and all of them elsewhere (one vmapped block per device)."""
  per_device = resolve_task_chunk(AUTO_TASK_CHUNK) or -(-num_runs // devices)
  return per_device * devices


def as_float_episodes(runs: Episode) -> Episode:
  """uint8 images (0..255) -> float32 in [0, 1], as the sampler gives the model."""
  scale = lambda x: jnp.asarray(x, jnp.float32) / 255.0
  return Episode(scale(runs.support_x), jnp.asarray(runs.support_y),
                 scale(runs.query_x), jnp.asarray(runs.query_y))


def evaluate_lake(learner, meta_params, cfg, runs: Episode, run_names, *, inner_steps: int,
                  metric_fn=None, seed: int = 0, mesh: Mesh | None = None) -> dict:
  """Error rate per run for every accuracy-like metric, and the mean over runs.

  learner: the learner as evaluated (its "test" phase, adapting with
  ``inner_steps`` steps: the number is only recorded here).
  runs: Episode of uint8 images with a leading run axis (R, 20, H, W, 1).
  mesh: optional "tasks" mesh (``sharding.make_mesh``) whose devices split the
  runs of each call (build ``learner`` for that many devices); the results do not
  depend on it. Logs progress lines (``advmaml.io.progress``) on long runs.
  Returns {"per_run": {run: {metric: error}}, "mean_error": {metric: {mean, ci95, std, n}}}.
  """
  check_model_fits_lake(cfg)
  if metric_fn is None:
    metric_fn = clean_accuracy
  devices = sharding.device_count(mesh)
  if devices == 1:
    mesh = None   # one compiled program for every single-device caller
  episodes = as_float_episodes(runs)
  num_runs = episodes.support_y.shape[0]
  per_call = runs_per_call(num_runs, devices)
  meta_params = sharding.replicate(meta_params, mesh)
  key = jax.random.key(seed)
  chunks = []
  progress = Progress("Lake runs", num_runs, "runs")   # a line every progress.EVERY_SECONDS
  for start in range(0, num_runs, per_call):
    # The last call is padded with copies of the last run; their results are dropped.
    take = np.minimum(np.arange(start, start + per_call), num_runs - 1)
    out = _score_runs(meta_params, jax.tree.map(lambda x: x[take], episodes), key, start,
                      learner=learner, metric_fn=metric_fn, mesh=mesh)
    chunks.append(jax.device_get(out))
    progress.update(min(start + per_call, num_runs))
  accuracy = {name: np.concatenate([c[name] for c in chunks])[:num_runs] for name in chunks[0]}
  errors = {name: 1.0 - np.asarray(values, np.float64) for name, values in accuracy.items()}
  per_run = {run: {name: float(errors[name][r]) for name in errors}
             for r, run in enumerate(run_names)}
  return {"per_run": per_run, "mean_error": {name: mean_and_ci95(e) for name, e in errors.items()},
          "inner_steps": inner_steps, "seed": seed}


# Published errors on the 20 runs (Lake, Salakhutdinov & Tenenbaum, Science 2015, and
# Koch et al. 2015 for the Siamese nets), beside which the table prints ours.
PUBLISHED_ERRORS = (("humans", 4.5), ("convolutional Siamese nets (Koch et al. 2015)", 8.0),
                    ("modified Hausdorff distance", 38.8))


def lake_table(workdirs, *, record_file: str = "eval_lake_runs.json") -> str:
  """A Markdown table: per workdir its learner, objective, meta-steps, wall time (as
  :mod:`advmaml.eval.compare` counts them) and its mean error on the runs, clean and at
  each epsilon of its ``record_file``, with 95% intervals over the 20 runs; then the
  published errors (clean only). A workdir without the record shows "-"."""
  from advmaml.eval import compare, plots   # local: they pull in matplotlib
  rows = []
  for workdir in workdirs:
    summary = compare.summarize(workdir, eval_pattern=record_file)
    path = pathlib.Path(workdir) / record_file
    errors = compare.read_json(path).get("mean_error", {}) if path.is_file() else {}
    rows.append((summary, errors))
  robust = [plots.by_epsilon(errors) for _, errors in rows]   # error stats by epsilon
  epsilons = sorted({eps for by_eps in robust for eps in by_eps})
  header = ["run", "learner", "objective", "meta-steps", "wall time", "clean error",
            *(f"error at eps {eps:g}" for eps in epsilons)]
  lines = [header, ["---"] * len(header)]
  for (summary, errors), by_eps in zip(rows, robust):
    lines.append([summary.label, summary.learner, summary.objective, f"{summary.steps:,}",
                  compare.duration(summary.wall_seconds),
                  compare.percent(errors.get("clean_accuracy")),
                  *(compare.percent(by_eps.get(eps)) for eps in epsilons)])
  for name, error in PUBLISHED_ERRORS:
    lines.append([name, "-", "published", "-", "-", f"{error:.1f}%", *("-" for _ in epsilons)])
  return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
