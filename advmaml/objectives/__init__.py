"""Bilevel objectives: the per-task outer loss the meta-train step differentiates.

An objective is ``objective(learner, meta_params, task, key) -> (loss, metrics)``
(see ``objectives.natural``). ``OBJECTIVES`` maps each ``--objective`` name to a
factory that builds the objective from the run's ``Config`` (binding e.g. the
training attack). A new objective is one file plus one line here::

    def my_objective(learner, meta_params, task, key):
      state = learner.adapt(meta_params, task.support_x, task.support_y, adapt_key(key))
      loss, acc = query_loss(learner, state, task.query_x, task.query_y)
      return loss, {"loss": loss, "accuracy": acc}

    OBJECTIVES["mine"] = lambda cfg: my_objective

It then appears in ``--objective``'s choices and works with every learner.
"""

from __future__ import annotations

from typing import Callable

from advmaml.objectives import robust, transfer
from advmaml.objectives.natural import natural

Objective = Callable[..., tuple]

# name -> factory(cfg) -> objective; factories read the settings they need from the config.
OBJECTIVES: dict[str, Callable[[object], Objective]] = {
    "natural": lambda cfg: natural,
    "aq": robust.aq_from_config,
    "adml": robust.adml_from_config,
    "rmaml": robust.rmaml_from_config,
    "adv_support": robust.adversarial_support_from_config,
    "transfer": lambda cfg: transfer.transfer,           # the transfer baseline's classifier
    "transfer_at": transfer.transfer_at_from_config,     # ... adversarially trained
}


def get_objective(cfg) -> Objective:
  """The objective named by ``cfg.objective``, built from ``cfg``."""
  if cfg.objective not in OBJECTIVES:
    raise ValueError(f"unknown objective {cfg.objective!r}; choose one of {sorted(OBJECTIVES)}")
  return OBJECTIVES[cfg.objective](cfg)


__all__ = ["OBJECTIVES", "Objective", "get_objective", "natural"]
