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

import jax
import jax.numpy as jnp
import numpy as np

from advmaml.config import ConfigError
from advmaml.data.episodes import Episode
from advmaml.data.lake_runs import NUM_CLASSES
from advmaml.evaluation import clean_accuracy, mean_and_ci95


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


@functools.partial(jax.jit, static_argnames=("learner", "metric_fn"))
def _score_runs(meta_params, episodes: Episode, key, *, learner, metric_fn):
  def one(i, episode):
    return metric_fn(learner, meta_params, episode, jax.random.fold_in(key, i))
  return jax.vmap(one)(jnp.arange(episodes.support_y.shape[0]), episodes)


def as_float_episodes(runs: Episode) -> Episode:
  """uint8 images (0..255) -> float32 in [0, 1], as the sampler gives the model."""
  scale = lambda x: jnp.asarray(x, jnp.float32) / 255.0
  return Episode(scale(runs.support_x), jnp.asarray(runs.support_y),
                 scale(runs.query_x), jnp.asarray(runs.query_y))


def evaluate_lake(learner, meta_params, cfg, runs: Episode, run_names, *, inner_steps: int,
                  metric_fn=None, seed: int = 0) -> dict:
  """Error rate per run for every accuracy-like metric, and the mean over runs.

  learner: the learner as evaluated (its "test" phase, adapting with
  ``inner_steps`` steps: the number is only recorded here).
  runs: Episode of uint8 images with a leading run axis (R, 20, H, W, 1).
  Returns {"per_run": {run: {metric: error}}, "mean_error": {metric: {mean, ci95, std, n}}}.
  """
  check_model_fits_lake(cfg)
  if metric_fn is None:
    metric_fn = clean_accuracy
  accuracy = jax.device_get(_score_runs(meta_params, as_float_episodes(runs), jax.random.key(seed),
                                        learner=learner, metric_fn=metric_fn))
  errors = {name: 1.0 - np.asarray(values, np.float64) for name, values in accuracy.items()}
  per_run = {run: {name: float(errors[name][r]) for name in errors}
             for r, run in enumerate(run_names)}
  return {"per_run": per_run, "mean_error": {name: mean_and_ci95(e) for name, e in errors.items()},
          "inner_steps": inner_steps, "seed": seed}
