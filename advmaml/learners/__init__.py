"""Few-shot learners: the protocol (``learners.base``) and the registry ``--learner`` reads.

Each entry of ``LEARNERS`` is a factory ``(cfg, model, *, phase) -> learner``:
``model`` is the run's ``models.ModelSpec``, ``phase`` is "train" (the
meta-train step) or "test" (validation, evaluation, attacks: e.g. MAML's
``eval_inner_steps``). A new learner is one file with its class and factory,
plus one line here (or ``register`` from outside the library); it then works
with every objective, the evaluator, the attacks and ``--learner``.
"""

from __future__ import annotations

from typing import Callable

from advmaml.learners import maml, metaoptnet, protonet, r2d2, transfer
from advmaml.learners.base import (PHASES, FewShotLearner, adapt_key, check_phase,
                                   cross_entropy, initial_state, query_loss)
from advmaml.learners.maml import MAML

LearnerFactory = Callable[..., FewShotLearner]

LEARNERS: dict[str, LearnerFactory] = {
    "maml": maml.from_config,   # also FOMAML, ANIL, Meta-SGD (--first_order, --anil, --meta_sgd)
    "protonet": protonet.from_config,       # Snell et al. 2017
    "r2d2": r2d2.from_config,               # Bertinetto et al. 2019
    "metaoptnet": metaoptnet.from_config,   # Lee et al. 2019, the SVM head
    "transfer": transfer.from_config,       # the (adversarially trained) transfer baseline
}


def register(name: str, factory: LearnerFactory) -> None:
  """Adds a learner under ``name`` (ValueError if the name is taken)."""
  if name in LEARNERS:
    raise ValueError(f"a learner named {name!r} is already registered")
  LEARNERS[name] = factory


def make_learner(cfg, model, *, phase: str = "train") -> FewShotLearner:
  """The learner ``cfg.learner`` on ``model`` for ``phase`` ("train" or "test")."""
  if cfg.learner not in LEARNERS:
    raise ValueError(f"--learner={cfg.learner!r}; choose one of {sorted(LEARNERS)}")
  check_phase(phase)
  return LEARNERS[cfg.learner](cfg, model, phase=phase)


__all__ = ["FewShotLearner", "LEARNERS", "MAML", "PHASES", "adapt_key", "cross_entropy", "initial_state",
           "make_learner", "query_loss", "register"]
