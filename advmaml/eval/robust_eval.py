"""Robust few-shot evaluation: per-episode metric functions for ``evaluate_episodes``.

Three threat models (``target``), all at test time against fixed meta-parameters:

* ``"query"`` (evasion): adapt on the clean support set, then attack the query
  set against the adapted model with :func:`advmaml.adversary.attacks.worst_case`.
* ``"support"`` (poisoning): perturb the support images *before* adaptation so
  that, after adapting on them, the clean query set is misclassified. The
  gradient is taken through the inner loop (always second order: with
  first-order MAML the adapted weights would not depend on the support images).
* ``"both"``: the attacker may poison the support set, attack the query set,
  or both. A query example counts as robust only if it survives all three:
  query-only, support-only, and the query attack against the model adapted on
  the poisoned support.

Batch norm normalises the query batch with its own statistics (transductive),
so the query attack may, for each query example, perturb the whole batch to
break that example alone. Besides the attacks on the summed loss, the query
attack therefore runs, for every query example, the ``per_example`` attacks
aimed at it (:func:`advmaml.adversary.attacks.per_example`; N * Q attacks per episode
and config). Both numbers are reported: ``summed_robust_accuracy@<eps>``
(summed-loss attacks only) and ``robust_accuracy@<eps>`` (those and the
aimed ones). Without ``per_example`` attacks only the latter is written.

Robust accuracy follows :mod:`advmaml.adversary.attacks`: a query example is correct only
if it was classified correctly at *every* batch an attack evaluated, including
the clean one. It is ANDed once more with clean correctness, so robust <= clean
holds per episode by construction, and for ``"both"`` the result is at most
each of its components.

The metric functions must be hashable static jit arguments: build them with
:func:`make_metric_fn` (a cached ``functools.partial`` of the module-level
:func:`robust_metrics` with tuple arguments, so equal settings give the same
object and reuse the compiled evaluation).
"""

from __future__ import annotations

import functools
import struct
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from advmaml.adversary import attacks
from advmaml.adversary.attacks import AttackConfig
from advmaml.adversary.autoattack import PARTS as AUTOATTACK_PARTS, AutoAttackConfig, autoattack
from advmaml.data.episodes import Episode
from advmaml.learners.base import FewShotLearner as Learner, adapt_key

ATTACK_NAMES = ("pgd", "margin", "apgd", "fgsm", "autoattack")
TARGETS = ("query", "support", "both")
NORMS = ("linf", "l2")


# ----------------------------------------------------------------------------
# Attack settings.


def metric_key(epsilon: float, prefix: str = "robust_accuracy") -> str:
  """The metric name for one epsilon, e.g. ``robust_accuracy@0.05``."""
  return f"{prefix}@{float(epsilon)!r}"


def attack_config(name: str, epsilon: float, *, n_way: int, norm: str = "linf", steps: int = 20,
                  restarts: int = 1, relative_step_size: float | None = None,
                  square_queries: int = 5000) -> AttackConfig | AutoAttackConfig:
  """One named attack at radius ``epsilon``.

  pgd: PGD on cross-entropy; margin: PGD on the Carlini-Wagner margin;
  apgd: APGD on DLR (on cross-entropy when n_way < 3, where DLR is undefined);
  fgsm: one step of size epsilon from the clean point; autoattack:
  :func:`advmaml.adversary.autoattack.autoattack` with ``steps`` and ``restarts`` for
  its gradient attacks, up to n_way - 1 targets and ``square_queries``
  (query attacks only). ``relative_step_size`` (step / epsilon) overrides the
  attacks' default PGD/FGSM step size.
  """
  if name == "autoattack":
    return AutoAttackConfig(epsilon=float(epsilon), norm=norm, steps=steps, restarts=restarts,
                            targets=min(9, max(n_way - 1, 1)), square_queries=square_queries)
  step_size = None if relative_step_size is None else relative_step_size * epsilon
  common = dict(norm=norm, epsilon=float(epsilon), step_size=step_size)
  if name == "pgd":
    return AttackConfig("pgd", steps=steps, restarts=restarts, loss="ce", **common)
  if name == "margin":
    return AttackConfig("pgd", steps=steps, restarts=restarts, loss="margin", **common)
  if name == "apgd":
    return AttackConfig("apgd", steps=steps, restarts=restarts,
                        loss="dlr" if n_way >= 3 else "ce", **common)
  if name == "fgsm":
    # Deterministic classic FGSM: restarts would all be identical.
    return AttackConfig("fgsm", steps=1, restarts=1, random_start=False, loss="ce", **common)
  raise ValueError(f"unknown attack {name!r}; choose from {ATTACK_NAMES}")


def attack_sets(names: Sequence[str], epsilons: Sequence[float], **kwargs
                ) -> tuple[tuple[AttackConfig, ...], ...]:
  """One tuple of AttackConfigs per epsilon; kwargs as for :func:`attack_config`."""
  return tuple(tuple(attack_config(n, eps, **kwargs) for n in names) for eps in epsilons)


def _epsilon_of(cfgs: Sequence[AttackConfig]) -> float:
  if not cfgs:
    raise ValueError("every attack set needs at least one attack")
  eps = {c.epsilon for c in cfgs}
  norms = {c.norm for c in cfgs}
  if len(eps) != 1 or len(norms) != 1:
    raise ValueError(f"the attacks of one set must share epsilon and norm, got {eps}, {norms}")
  return eps.pop()


def _epsilon_key(key: jax.Array, epsilon: float) -> jax.Array:
  """A key that depends on epsilon's value only (via its float32 bits), so the
  result at one epsilon does not change with the other epsilons requested."""
  bits = struct.unpack("<I", struct.pack("<f", float(epsilon)))[0]
  return jax.random.fold_in(key, bits)


# ----------------------------------------------------------------------------
# Support poisoning.


class PoisonResult(NamedTuple):
  """Output of :func:`poison_support`.

  Attributes:
    support_x: (S, H, W, C) the strongest poisoned support set found (most
      query errors, then highest query cross-entropy).
    correct: (Q,) bool, True iff the query example was right after adapting
      on every support set the attack evaluated (the clean one included).
  """

  support_x: jax.Array
  correct: jax.Array


class _PoisonTrack(NamedTuple):
  x: jax.Array        # (S, H, W, C) best support set so far
  n_wrong: jax.Array  # () int32 query errors at x
  ce: jax.Array       # () summed query cross-entropy at x
  correct: jax.Array  # (Q,) bool, AND over every evaluated support set


def poison_support(learner: Learner, meta_params: dict, episode: Episode, key: jax.Array, *,
                   cfgs: Sequence[AttackConfig]) -> PoisonResult:
  """PGD on the support images through the adaptation (one episode, no task axis).

  Maximises, for each attack config in turn, the summed ``cfg.loss`` of the
  clean query set under ``adapt(meta_params, support_x_adv)``, taking
  ``cfg.steps`` projected steps of ``cfg.resolved_step_size()`` per restart
  (APGD configs run as plain PGD with their loss; FGSM takes one step). Each
  support image has its own eps-ball. Attack i uses ``fold_in(key, i)``,
  restart r ``fold_in(fold_in(key, i), r)``.

  episode: support_x (S, H, W, C), support_y (S,), query_x (Q, H, W, C), query_y (Q,).
  learner: a "test"-phase learner (MAML's: second order, so the attacker's
  gradient goes through the whole inner loop).
  """
  meta = lax.stop_gradient(meta_params)
  sx, sy, qx, qy = (lax.stop_gradient(a) for a in
                    (episode.support_x, episode.support_y, episode.query_x, episode.query_y))
  k_adapt = adapt_key(key)

  def query_logits(support_x):  # (S, H, W, C) -> (Q, N)
    return learner.logits(learner.adapt(meta, support_x, sy, k_adapt), qx)

  def record(tr: _PoisonTrack, s, logits) -> _PoisonTrack:
    wrong = jnp.argmax(logits, -1) != qy
    n_wrong = jnp.sum(wrong, dtype=jnp.int32)
    ce = jnp.sum(attacks.attack_objective(logits, qy, "ce"))
    better = (n_wrong > tr.n_wrong) | ((n_wrong == tr.n_wrong) & (ce > tr.ce))
    return _PoisonTrack(x=jnp.where(better, s, tr.x), n_wrong=jnp.where(better, n_wrong, tr.n_wrong),
                        ce=jnp.where(better, ce, tr.ce), correct=tr.correct & ~wrong)

  # The clean support set counts as evaluated: poisoned accuracy <= clean accuracy.
  tr = _PoisonTrack(x=sx, n_wrong=jnp.asarray(-1, jnp.int32), ce=jnp.asarray(-jnp.inf, jnp.float32),
                    correct=jnp.ones(qy.shape, bool))
  tr = record(tr, sx, query_logits(sx))

  for i, cfg in enumerate(cfgs):
    k_attack = jax.random.fold_in(key, i)
    steps = cfg.resolved_steps()
    step_size = cfg.resolved_step_size()

    def total(s, loss=cfg.loss):
      logits = query_logits(s)
      return jnp.sum(attacks.attack_objective(logits, qy, loss)), logits

    grad_fn = jax.value_and_grad(total, has_aux=True)

    def one_restart(r, tr, cfg=cfg, k_attack=k_attack, steps=steps, step_size=step_size,
                    grad_fn=grad_fn):
      s0 = attacks.random_start(jax.random.fold_in(k_attack, r), sx, cfg)

      # Evaluates s_0..s_steps (the last update is discarded), as attacks.pgd
      # does, so k steps are a prefix of 2k steps at a fixed step size.
      def body(_, carry):
        s, tr = carry
        (_, logits), g = grad_fn(s)
        tr = record(tr, s, logits)
        s = attacks.pgd_step(s, g, sx, cfg, step_size)
        return s, tr

      return lax.fori_loop(0, steps + 1, body, (s0, tr))[1]

    tr = lax.fori_loop(0, cfg.restarts, one_restart, tr)
  return PoisonResult(lax.stop_gradient(tr.x), tr.correct)


# ----------------------------------------------------------------------------
# Per-episode metric.


def _query_correct(learner: Learner, fast: dict, episode: Episode, key, cfgs, aimed_cfgs,
                   aim_chunk) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """(summed, all, cumulative): the query attack on adapted ``fast``.

  summed: (Q,) worst case over ``cfgs`` (summed-loss attacks) with ``key``, as
  before aimed attacks existed, so its numbers do not change, AND AutoAttack
  if cfgs hold it (key ``fold_in(key, 2)``). all: (Q,) that AND the
  ``aimed_cfgs`` attacks aimed at each query example (key
  ``fold_in(key, 1)``); equal to summed without aimed_cfgs. cumulative:
  (parts, Q) AutoAttack's robustness after each of its parts, or None.
  """
  qx, qy = episode.query_x, episode.query_y
  plain = tuple(c for c in cfgs if isinstance(c, AttackConfig))
  auto = [c for c in cfgs if isinstance(c, AutoAttackConfig)]
  summed = jnp.ones(qy.shape, bool)
  if plain:
    summed = attacks.worst_case(plain, learner.logits, fast, qx, qy, key).correct
  cumulative = None
  if auto:
    aa = autoattack(auto[0], learner.logits, fast, qx, qy, jax.random.fold_in(key, 2))
    summed, cumulative = summed & aa.correct, aa.cumulative
  if not aimed_cfgs:
    return summed, summed, cumulative
  aimed = attacks.per_example(aimed_cfgs, learner.logits, fast, qx, qy,
                              jax.random.fold_in(key, 1), chunk=aim_chunk).correct
  return summed, summed & aimed, cumulative


def _stack(*trees):
  return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def robust_metrics(learner: Learner, meta_params: dict, episode: Episode, key: jax.Array, *,
                   attack_sets: tuple[tuple[AttackConfig, ...], ...], target: str = "query",
                   per_example_sets: tuple[tuple[AttackConfig, ...], ...] = (),
                   per_example_chunk: int = 0, alone: bool = False) -> dict:
  """Clean and robust query accuracy of one episode (an ``EpisodeMetricFn``).

  episode: one task without a task axis (support (S, H, W, C), query (Q, H, W, C)).
  attack_sets: per epsilon, the attacks whose per-example worst case is taken.
  per_example_sets: () or, per epsilon (same order and radii as attack_sets),
    the attacks aimed at each query example in turn (query attacks only; not
    for target "support", whose query set is clean). per_example_chunk: aims
    vmapped together (0: all).
  Returns scalars ``clean_accuracy`` and ``robust_accuracy@<eps>`` per
  epsilon; for ``target="both"`` also ``query_robust_accuracy@<eps>`` and
  ``support_robust_accuracy@<eps>`` (the single-sided components); with
  per_example_sets also ``summed_robust_accuracy@<eps>``, the robust accuracy
  under the summed-loss attacks alone (>= robust_accuracy per example); with
  an AutoAttackConfig in the set (target "query" only) also
  ``autoattack_<part>_robust_accuracy@<eps>``, AutoAttack's own robust
  accuracy after each of its parts; with ``alone`` (target "query" only) also
  ``alone_robust_accuracy@<eps>``: each query attacked by itself with the
  other queries clean (``attacks.alone``, the set's gradient attacks, key
  ``fold_in(k_query, 3)``), the threat model where the adversary holds one
  query; ``robust_accuracy`` is the joint one, where it holds the whole batch.
  The attacks at an epsilon use a key derived from ``key`` and that epsilon:
  query attack ``fold_in(k_eps, 0)``, support attack ``fold_in(k_eps, 1)``.
  """
  if target not in TARGETS:
    raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
  if target != "query" and any(isinstance(c, AutoAttackConfig) for cfgs in attack_sets
                               for c in cfgs):
    raise ValueError("autoattack attacks the query set; use target 'query'")
  if alone and target != "query":
    raise ValueError("alone attacks one query at a time; use target 'query'")
  if per_example_sets and (target == "support" or len(per_example_sets) != len(attack_sets)):
    raise ValueError("per_example_sets need a query attack and one set per epsilon")
  k_adapt = adapt_key(key)
  fast = learner.adapt(meta_params, episode.support_x, episode.support_y, k_adapt)
  clean_correct = jnp.argmax(learner.logits(fast, episode.query_x), -1) == episode.query_y
  correct_by_name = {"clean_accuracy": clean_correct}  # name -> (Q,) bool
  for i, cfgs in enumerate(attack_sets):
    eps = _epsilon_of(cfgs)
    aimed_cfgs = per_example_sets[i] if per_example_sets else ()
    if aimed_cfgs and _epsilon_of(aimed_cfgs + tuple(cfgs)) != eps:
      raise ValueError("per_example_sets must follow attack_sets' epsilons")
    k_eps = _epsilon_key(key, eps)
    k_query, k_support = jax.random.fold_in(k_eps, 0), jax.random.fold_in(k_eps, 1)
    query = functools.partial(_query_correct, learner, episode=episode, key=k_query, cfgs=cfgs,
                              aimed_cfgs=aimed_cfgs, aim_chunk=per_example_chunk)
    summed = None
    if target == "query":
      summed, q_all, cumulative = query(fast)
      summed, correct = clean_correct & summed, clean_correct & q_all
      if alone:
        plain = tuple(c for c in cfgs if isinstance(c, AttackConfig)) or tuple(aimed_cfgs)
        ok = attacks.alone(plain, learner.logits, fast, episode.query_x, episode.query_y,
                           jax.random.fold_in(k_query, 3), chunk=per_example_chunk).correct
        correct_by_name[metric_key(eps, "alone_robust_accuracy")] = clean_correct & ok
      if cumulative is not None:
        parts = next(c for c in cfgs if isinstance(c, AutoAttackConfig)).parts
        for name, ok in zip(parts, cumulative):
          correct_by_name[metric_key(eps, f"autoattack_{name}_robust_accuracy")] = clean_correct & ok
    elif target == "support":
      poisoned = poison_support(learner, meta_params, episode, k_support, cfgs=cfgs)
      correct = clean_correct & poisoned.correct
    else:
      poisoned = poison_support(learner, meta_params, episode, k_support, cfgs=cfgs)
      fast_poisoned = learner.adapt(meta_params, poisoned.support_x, episode.support_y, k_adapt)
      # One traced attack for both models (clean-adapted, poisoned-adapted): half the compile.
      summed_q, all_q, _ = jax.vmap(query)(_stack(fast, fast_poisoned))  # (2, Q) each
      (s_clean, s_poisoned), (q_clean, q_poisoned) = summed_q, all_q
      query_ok = clean_correct & q_clean
      support_ok = clean_correct & poisoned.correct
      correct = query_ok & support_ok & q_poisoned
      summed = clean_correct & s_clean & support_ok & s_poisoned
      correct_by_name[metric_key(eps, "query_robust_accuracy")] = query_ok
      correct_by_name[metric_key(eps, "support_robust_accuracy")] = support_ok
    correct_by_name[metric_key(eps)] = correct
    if aimed_cfgs:
      correct_by_name[metric_key(eps, "summed_robust_accuracy")] = summed
  # One reduction for all rows: equal counts give bit-equal accuracies, so the
  # per-example ANDs carry over to the floats exactly (robust <= clean).
  names = list(correct_by_name)
  accuracy = jnp.mean(jnp.stack([correct_by_name[n] for n in names]).astype(jnp.float32), axis=1)
  return {n: accuracy[i] for i, n in enumerate(names)}


def make_metric_fn(attack_names: Sequence[str], epsilons: Sequence[float], *, n_way: int,
                   norm: str = "linf", steps: int = 20, restarts: int = 1,
                   relative_step_size: float | None = None, target: str = "query",
                   per_example: Sequence[str] = (), per_example_chunk: int = 0,
                   square_queries: int = 5000, alone: bool = False):
  """A hashable metric_fn for ``evaluate_episodes``: clean plus robust accuracy
  per epsilon, under the worst case of the named attacks (see
  :func:`attack_config`) and, with ``per_example`` names, of those attacks
  aimed at each query example (same steps and restarts); with ``alone``, also
  each query attacked by itself (see :func:`robust_metrics`). Cached, so equal
  arguments give the same object and jit reuses its compiled evaluation (a
  partial hashes by identity)."""
  if target not in TARGETS:
    raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
  if per_example and target == "support":
    raise ValueError("per_example attacks attack the query set; target 'support' has none")
  if "autoattack" in attack_names and target != "query":
    raise ValueError("autoattack attacks the query set; use target 'query'")
  if "autoattack" in per_example:
    raise ValueError("autoattack cannot be aimed at one example; per_example takes gradient attacks")
  if alone and target != "query":
    raise ValueError("alone attacks one query at a time; use target 'query'")
  return _cached_metric_fn(tuple(attack_names), tuple(float(e) for e in epsilons), n_way,
                           norm, steps, restarts, relative_step_size, target,
                           tuple(per_example), int(per_example_chunk), int(square_queries),
                           bool(alone))


@functools.lru_cache(maxsize=None)
def _cached_metric_fn(names, epsilons, n_way, norm, steps, restarts,
                      relative_step_size, target, per_example, per_example_chunk, square_queries,
                      alone=False):
  kwargs = dict(n_way=n_way, norm=norm, steps=steps, restarts=restarts,
                relative_step_size=relative_step_size, square_queries=square_queries)
  sets = attack_sets(names, epsilons, **kwargs)
  aimed = attack_sets(per_example, epsilons, **kwargs) if per_example else ()
  return functools.partial(robust_metrics, attack_sets=sets,
                           target=target, per_example_sets=aimed,
                           per_example_chunk=per_example_chunk, alone=alone)


# ----------------------------------------------------------------------------
# Examples for plots.


@functools.partial(jax.jit, static_argnames=("learner", "cfgs", "target"))
def adversarial_examples(learner: Learner, meta_params: dict, episode: Episode, key: jax.Array, *,
                         cfgs: tuple[AttackConfig, ...],
                         target: str = "query") -> dict:
  """Clean and attacked images of one episode, with predictions, for plotting.

  Uses the keys :func:`robust_metrics` uses at that epsilon. For "query" and
  "both": query images (Q, H, W, C), the clean ones predicted by the model
  adapted on the clean support, the attacked ones by the model adapted on the
  (for "both": poisoned) support. For "support": the clean and poisoned
  support images (S, H, W, C), each predicted by the model adapted on it.
  Predictions of attacked images are for the batch of per-example strongest
  points, which (batch norm) may differ from those at the iterate that found them.
  Returns {"clean_x", "adv_x", "y", "clean_pred", "adv_pred"}.
  """
  eps = _epsilon_of(cfgs)
  k_eps = _epsilon_key(key, eps)
  k_query, k_support = jax.random.fold_in(k_eps, 0), jax.random.fold_in(k_eps, 1)
  predict = lambda p, x: jnp.argmax(learner.logits(p, x), -1)
  k_adapt = adapt_key(key)
  fast = learner.adapt(meta_params, episode.support_x, episode.support_y, k_adapt)
  adv_fast = fast
  if target in ("support", "both"):
    support_adv = poison_support(learner, meta_params, episode, k_support, cfgs=cfgs).support_x
    adv_fast = learner.adapt(meta_params, support_adv, episode.support_y, k_adapt)
  if target == "support":
    return {"clean_x": episode.support_x, "adv_x": support_adv, "y": episode.support_y,
            "clean_pred": predict(fast, episode.support_x),
            "adv_pred": predict(adv_fast, support_adv)}
  plain = tuple(c for c in cfgs if isinstance(c, AttackConfig))
  if plain:
    x_adv = attacks.worst_case(plain, learner.logits, adv_fast, episode.query_x,
                               episode.query_y, k_query).x_adv
  else:  # AutoAttack alone, with its key in robust_metrics
    auto = next(c for c in cfgs if isinstance(c, AutoAttackConfig))
    x_adv = autoattack(auto, learner.logits, adv_fast, episode.query_x, episode.query_y,
                       jax.random.fold_in(k_query, 2)).x_adv
  return {"clean_x": episode.query_x, "adv_x": x_adv, "y": episode.query_y,
          "clean_pred": predict(fast, episode.query_x), "adv_pred": predict(adv_fast, x_adv)}


__all__ = [
    "ATTACK_NAMES", "AUTOATTACK_PARTS", "TARGETS", "NORMS", "metric_key", "attack_config", "attack_sets",
    "PoisonResult", "poison_support", "robust_metrics", "make_metric_fn", "adversarial_examples",
]
