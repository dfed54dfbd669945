"""Bilevel objectives: the per-task outer loss the meta-train step differentiates.

An objective is a plain function::

    objective(learner, meta_params, task, key) -> (loss, metrics)

``task`` is one ``Episode`` (no task axis: the trainer vmaps over tasks),
``key`` is that task's PRNG key, ``loss`` a scalar and ``metrics`` a dict of
scalars averaged over tasks for logging. A new objective is a few lines::

    def my_objective(learner, meta_params, task, key):
      fast = learner.adapt(meta_params, task.support_x, task.support_y)
      loss, acc = learner.loss(fast, task.query_x, task.query_y)
      return loss, {"loss": loss, "accuracy": acc}

and is passed to ``make_train_step``. To make it selectable by ``--objective``,
register a factory that builds it from the run's ``Config``::

    OBJECTIVES["mine"] = lambda cfg: my_objective
"""

from __future__ import annotations

from typing import Callable

from advmaml.data.episodes import Episode
from advmaml.maml import Learner

Objective = Callable[[Learner, dict, Episode, object], tuple]


def natural(learner: Learner, meta_params: dict, task: Episode, key):
  """Plain MAML: adapt on the clean support set, outer loss on the clean query set."""
  del key
  fast = learner.adapt(meta_params, task.support_x, task.support_y)
  loss, accuracy = learner.loss(fast, task.query_x, task.query_y)
  return loss, {"loss": loss, "accuracy": accuracy}


# name -> factory(cfg) -> objective; factories read the settings they need from the config.
OBJECTIVES: dict[str, Callable[[object], Objective]] = {
    "natural": lambda cfg: natural,
}


def get_objective(cfg) -> Objective:
  """The objective named by ``cfg.objective``, built from ``cfg``."""
  if cfg.objective not in OBJECTIVES:
    raise ValueError(f"unknown objective {cfg.objective!r}; choose one of {sorted(OBJECTIVES)}")
  return OBJECTIVES[cfg.objective](cfg)


# Registers the robust objectives ("aq", "adml", "rmaml", "adv_support") so that
# --objective and config.validate see them. At the bottom because
# robust_objectives imports OBJECTIVES from this (by then initialised) module.
from advmaml import robust_objectives  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import
