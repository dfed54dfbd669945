"""Training the transfer baseline's classifier (``learners/transfer.py``) on the meta-batch's images.

Not a bilevel objective: each task's support and query images are classified
over all C classes of the meta-train split, with the labels the episode's
``classes`` gives them (label n of the episode is class ``classes[n]``), so a
meta-batch of T N-way episodes with K + Q images per class is an ordinary
mini-batch of T*N*(K+Q) labelled images. ``transfer`` trains on them as they
are; ``transfer_at`` on PGD adversarial examples against the classifier, the
training-time attack's settings (``--train_attack``, ``--train_epsilon``, ...):
adversarial training (Madry et al. 2018), the AQ paper's transfer baseline.
The perturbations are ``stop_gradient``-ed data, as in every robust objective.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

from advmaml.adversary import attacks
from advmaml.config import train_attack_config
from advmaml.data.episodes import Episode
from advmaml.learners.base import cross_entropy


def transfer(learner, meta_params: dict, task: Episode, key, *,
             attack_cfg: attacks.AttackConfig | None = None):
  """Cross-entropy of ``learner.classify`` on the task's images (adversarial with attack_cfg).

  Metrics: loss, accuracy (the clean images' C-way accuracy) and, with an attack,
  adv_accuracy (the adversarial images trained on).
  """
  if not hasattr(learner, "classify"):
    raise ValueError("the transfer objectives train the transfer baseline's classifier; "
                     "use --learner=transfer")
  if task.classes is None:
    raise ValueError("the transfer objectives need the episodes' class indices (Episode.classes)")
  x = jnp.concatenate([task.support_x, task.query_x])
  y = task.classes[jnp.concatenate([task.support_y, task.query_y])]    # (B,) in [0, C)
  classify = learner.classify     # (params, (B, H, W, C)) -> (B, C), attacked like any logits
  logits = classify(meta_params, x)
  loss, accuracy = cross_entropy(logits, y)
  metrics = {"accuracy": accuracy}
  if attack_cfg is not None:
    x_adv = attacks.attack(attack_cfg, classify, lax.stop_gradient(meta_params), x, y, key).x_adv
    loss, metrics["adv_accuracy"] = cross_entropy(classify(meta_params, lax.stop_gradient(x_adv)), y)
  metrics["loss"] = loss
  return loss, metrics


def transfer_at_from_config(cfg):
  return functools.partial(transfer, attack_cfg=train_attack_config(cfg))
