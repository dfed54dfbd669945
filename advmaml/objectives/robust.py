"""Adversarially robust bilevel objectives: AQ, ADML, R-MAML, adversarial support.

Every objective has the signature of :mod:`advmaml.objectives`::

    objective(learner, meta_params, task, key) -> (loss, metrics)

with the attack's settings bound by its ``*_from_config`` factory (from
``config.train_attack_config(cfg)``), which ``objectives.OBJECTIVES`` registers.
They use the learner through the protocol only (``adapt``, ``logits``; ADML and
adversarial support also ``initial_state``), so they train any learner. Names, as selected by ``--objective``:

* ``"aq"``: Adversarial Querying (Goldblum, Fowl & Goldstein, NeurIPS 2020).
* ``"adml"``: ADML (Yin et al. 2018).
* ``"rmaml"``: R-MAML_out with the TRADES regulariser (Wang et al., ICLR 2021).
* ``"adv_support"``: adversarial support set in the inner loop, clean query.

Adversarial examples are data: each is computed by an attack whose output is
``stop_gradient``-ed, so the meta-gradient treats the perturbation as a
constant (as all of these papers do; differentiating through PGD's sign steps
would give zero almost everywhere anyway). To make this checkable, every
objective accepts ``adv=`` (a dict of already perturbed images used instead of
running the attack) and ``with_inputs=True`` (also return that dict).

Keys: ``k_support, k_query = jax.random.split(key)``; attacks on the support
set use ``k_support``, attacks on the query set ``k_query``.

All objectives are jittable and vmappable over tasks (the trainer vmaps them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from advmaml.adversary import attacks
from advmaml.config import train_attack_config
from advmaml.data.episodes import Episode
from advmaml.learners.base import (FewShotLearner as Learner, adapt_key, cross_entropy,
                                   initial_state, query_loss)

# TRADES' start when no random start is asked for (Zhang et al. 2019): the KL
# is minimal, so its gradient is exactly zero, at the clean point itself.
_TRADES_INIT_STD = 1e-3


# ----------------------------------------------------------------------------
# Pieces.


def mean_kl(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
  """Mean over the batch of KL(p || q) = sum_k p_k (log p_k - log q_k).

  logits_p, logits_q: (B, N) -> scalar >= 0 (TRADES' "batchmean" reduction).
  """
  log_p = jax.nn.log_softmax(logits_p)
  log_q = jax.nn.log_softmax(logits_q)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1).mean()


def _kl_start(key: jax.Array, x: jax.Array, cfg: attacks.AttackConfig) -> jax.Array:
  """Uniform point of the eps-ball (random_start), else TRADES' x + 0.001 * N(0, 1)."""
  if not cfg.random_start:
    return attacks.project(x + _TRADES_INIT_STD * jax.random.normal(key, x.shape, x.dtype), x, cfg)
  return attacks.random_start(key, x, cfg)


def kl_attack(cfg: attacks.AttackConfig, logits_fn, params, x: jax.Array,
              key: jax.Array) -> jax.Array:
  """TRADES' inner maximisation: x_adv maximising sum_i KL(p(x)_i || p(x_adv)_i).

  Needs no labels: it pushes the prediction away from the clean prediction,
  which the CE attacks of :mod:`advmaml.adversary.attacks` cannot do (CE with the clean
  argmax as label only approximates the KL and ignores the clean confidence).
  FGSM (one step, default size eps) or PGD (``cfg.steps`` steps, default size
  2.5 * eps / steps) from ``_kl_start``; the last iterate is returned, as in
  TRADES. The batch is perturbed jointly (batch norm couples its examples).

  Args:
    cfg: "fgsm" or "pgd" attack config; ``loss``, ``targeted`` and
      ``restarts`` are ignored.
    logits_fn: (params, (B, H, W, C)) -> (B, N).
    params: the attacked network's params (held constant).
    x: (B, H, W, C) clean inputs in [cfg.clip_min, cfg.clip_max].
    key: PRNG key of the start point.
  Returns:
    x_adv: (B, H, W, C), stop_gradient-ed, within the eps-ball and the box.
  """
  if cfg.name not in ("fgsm", "pgd"):
    raise ValueError(f"the KL (TRADES) attack runs FGSM or PGD, not {cfg.name!r}")
  params = lax.stop_gradient(params)
  x = lax.stop_gradient(x)
  clean_logits = logits_fn(params, x)
  kl_sum = lambda xa: mean_kl(clean_logits, logits_fn(params, xa)) * x.shape[0]
  grad_fn = jax.grad(kl_sum)
  step_size = cfg.resolved_step_size()

  def step(_, xa):
    return attacks.pgd_step(xa, grad_fn(xa), x, cfg, step_size)

  x_adv = lax.fori_loop(0, cfg.resolved_steps(), step, _kl_start(key, x, cfg))
  return lax.stop_gradient(x_adv)


def _finish(loss, metrics, adv, with_inputs):
  return (loss, metrics, adv) if with_inputs else (loss, metrics)


# ----------------------------------------------------------------------------
# Objectives.


def adversarial_querying(learner: Learner, meta_params: dict, task: Episode, key, *,
                         attack_cfg: attacks.AttackConfig, trades_beta: float = 0.0,
                         adv: dict | None = None, with_inputs: bool = False):
  """Adversarial Querying (Goldblum et al. 2020).

  Adapt on the clean support set; attack the query set against the adapted
  params (key ``k_query``); outer loss = CE on the adversarial queries, plus
  ``trades_beta * KL(p_clean || p_adv)`` on the query set when trades_beta > 0
  (the points still come from the CE attack).

  adv: optional {"query_x": (N*Q, H, W, C)} used instead of the attack.
  Metrics: loss, accuracy (clean query), adv_accuracy (the adversarial query
  batch trained on), and kl when trades_beta > 0.
  """
  _, k_query = jax.random.split(key)
  fast = learner.adapt(meta_params, task.support_x, task.support_y, adapt_key(key))
  if adv is None:
    adv = {"query_x": attacks.attack(attack_cfg, learner.logits, fast, task.query_x,
                                     task.query_y, k_query).x_adv}
  logits_adv = learner.logits(fast, lax.stop_gradient(adv["query_x"]))
  logits_clean = learner.logits(fast, task.query_x)
  loss, adv_accuracy = cross_entropy(logits_adv, task.query_y)
  _, accuracy = cross_entropy(logits_clean, task.query_y)
  metrics = {"accuracy": accuracy, "adv_accuracy": adv_accuracy}
  if trades_beta > 0:  # static: no KL graph when off
    kl = mean_kl(logits_clean, logits_adv)
    loss = loss + trades_beta * kl
    metrics["kl"] = kl
  metrics["loss"] = loss
  return _finish(loss, metrics, adv, with_inputs)


def adml(learner: Learner, meta_params: dict, task: Episode, key, *,
         attack_cfg: attacks.AttackConfig, adv: dict | None = None,
         with_inputs: bool = False):
  """ADML (Yin et al. 2018): mean of (clean support -> adversarial query) and
  (adversarial support -> clean query).

  Choice of attacked models: the adversarial support is generated against the
  pre-adaptation meta-params (key ``k_support``), as in ADML, where it is what
  the inner loop then adapts on; the adversarial query against the params
  adapted on the clean support (key ``k_query``), so that this half is exactly
  AQ's loss. (ADML itself generates both sets on the meta-model.)

  adv: optional {"support_x": (N*K, H, W, C), "query_x": (N*Q, H, W, C)}.
  Metrics: loss, accuracy (clean support -> clean query), adv_accuracy (clean
  support -> adversarial query), adv_support_accuracy (adversarial support ->
  clean query).
  """
  k_support, k_query = jax.random.split(key)
  fast_clean = learner.adapt(meta_params, task.support_x, task.support_y, adapt_key(key))
  if adv is None:
    adv = {
        "support_x": attacks.attack(attack_cfg, learner.logits,
                                    initial_state(learner, meta_params, "--objective=adml"),
                                    task.support_x, task.support_y, k_support).x_adv,
        "query_x": attacks.attack(attack_cfg, learner.logits, fast_clean, task.query_x,
                                  task.query_y, k_query).x_adv,
    }
  fast_adv = learner.adapt(meta_params, lax.stop_gradient(adv["support_x"]), task.support_y,
                           adapt_key(key))
  loss_adv_query, adv_accuracy = query_loss(learner, fast_clean,
                                            lax.stop_gradient(adv["query_x"]), task.query_y)
  loss_adv_support, adv_support_accuracy = query_loss(learner, fast_adv, task.query_x,
                                                      task.query_y)
  _, accuracy = query_loss(learner, fast_clean, task.query_x, task.query_y)
  loss = 0.5 * (loss_adv_query + loss_adv_support)
  metrics = {"loss": loss, "accuracy": accuracy, "adv_accuracy": adv_accuracy,
             "adv_support_accuracy": adv_support_accuracy}
  return _finish(loss, metrics, adv, with_inputs)


def rmaml(learner: Learner, meta_params: dict, task: Episode, key, *,
          attack_cfg: attacks.AttackConfig, beta: float,
          adv: dict | None = None, with_inputs: bool = False):
  """R-MAML_out with TRADES (Wang et al., ICLR 2021).

  Clean inner loop; outer loss = CE(clean query) + beta * KL(p_clean || p_adv)
  on the query set, where the adversarial query maximises that KL against the
  adapted params (:func:`kl_attack`, FGSM or PGD, key ``k_query``). Gradients
  flow through both p_clean and p_adv, as in TRADES. (The authors' code also
  puts the support set into the KL batch; here it is the query set only.)

  adv: optional {"query_x": (N*Q, H, W, C)}.
  Metrics: loss, accuracy (clean query), adv_accuracy (on the KL-adversarial
  query batch), kl.
  """
  _, k_query = jax.random.split(key)
  fast = learner.adapt(meta_params, task.support_x, task.support_y, adapt_key(key))
  if adv is None:
    adv = {"query_x": kl_attack(attack_cfg, learner.logits, fast, task.query_x, k_query)}
  logits_clean = learner.logits(fast, task.query_x)
  logits_adv = learner.logits(fast, lax.stop_gradient(adv["query_x"]))
  ce, accuracy = cross_entropy(logits_clean, task.query_y)
  _, adv_accuracy = cross_entropy(logits_adv, task.query_y)
  kl = mean_kl(logits_clean, logits_adv)
  loss = ce + beta * kl
  metrics = {"loss": loss, "accuracy": accuracy, "adv_accuracy": adv_accuracy, "kl": kl}
  return _finish(loss, metrics, adv, with_inputs)


def adversarial_support(learner: Learner, meta_params: dict, task: Episode, key, *,
                        attack_cfg: attacks.AttackConfig, adv: dict | None = None,
                        with_inputs: bool = False):
  """Adversarial support training: attack the support set against the
  meta-params (key ``k_support``), adapt on it, outer loss on the clean query.

  adv: optional {"support_x": (N*K, H, W, C)}.
  Metrics: loss, accuracy (clean query after adapting on the attacked support).
  """
  k_support, _ = jax.random.split(key)
  if adv is None:
    adv = {"support_x": attacks.attack(attack_cfg, learner.logits,
                                       initial_state(learner, meta_params, "--objective=adv_support"),
                                       task.support_x, task.support_y, k_support).x_adv}
  fast = learner.adapt(meta_params, lax.stop_gradient(adv["support_x"]), task.support_y,
                       adapt_key(key))
  loss, accuracy = query_loss(learner, fast, task.query_x, task.query_y)
  return _finish(loss, {"loss": loss, "accuracy": accuracy}, adv, with_inputs)


# ----------------------------------------------------------------------------
# Factories: cfg -> objective (registered in advmaml/objectives/__init__.py).


def aq_from_config(cfg):
  return functools.partial(adversarial_querying, attack_cfg=train_attack_config(cfg),
                           trades_beta=cfg.trades_beta)


def adml_from_config(cfg):
  return functools.partial(adml, attack_cfg=train_attack_config(cfg))


def rmaml_from_config(cfg):
  attack_cfg = train_attack_config(cfg)
  if attack_cfg.name not in ("fgsm", "pgd"):
    raise ValueError(f"--objective=rmaml needs --train_attack=fgsm or pgd, not {attack_cfg.name!r}")
  return functools.partial(rmaml, attack_cfg=attack_cfg, beta=cfg.rmaml_beta)


def adversarial_support_from_config(cfg):
  return functools.partial(adversarial_support, attack_cfg=train_attack_config(cfg))
