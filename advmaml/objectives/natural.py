"""The natural bilevel objective: MAML's (Finn et al. 2017), for any learner.

An objective is a plain function::

    objective(learner, meta_params, task, key) -> (loss, metrics)

``task`` is one ``Episode`` (no task axis: the trainer vmaps over tasks),
``key`` is that task's PRNG key, ``loss`` a scalar and ``metrics`` a dict of
scalars averaged over tasks for logging. It may use the learner only through
the protocol (``advmaml.learners.base``): ``adapt`` and ``logits``.
"""

from __future__ import annotations

from advmaml.data.episodes import Episode
from advmaml.learners.base import FewShotLearner, adapt_key, query_loss


def natural(learner: FewShotLearner, meta_params, task: Episode, key):
  """Adapt on the clean support set, outer loss on the clean query set."""
  state = learner.adapt(meta_params, task.support_x, task.support_y, adapt_key(key))
  loss, accuracy = query_loss(learner, state, task.query_x, task.query_y)
  return loss, {"loss": loss, "accuracy": accuracy}
