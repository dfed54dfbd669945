"""Certified L2 robustness of the adapted learner by randomized smoothing.

Cohen, Rosenfeld & Kolter (2019): the smoothed classifier
g(x) = argmax_c P(f(x + e) = c), e ~ N(0, sigma^2 I), is robust within L2
radius sigma * Phi^-1(pA) around x when its top class has probability pA >
1/2. CERTIFY estimates it from samples: n0 noisy copies choose the class cA,
n fresh copies count nA hits of cA, and pA_lower, the one-sided (1 - alpha)
Clopper-Pearson lower bound on pA, gives the radius sigma *
Phi^-1(pA_lower); with pA_lower <= 1/2 it abstains. With probability at least
1 - alpha over the samples, a returned class is g's and g is constant within
the radius.

Batch-coupled models (batch norm over the query batch, transductive): a noisy
copy is the whole query batch plus noise, so f is the map from the batch to
each example's class. The certificate of example i then covers every
perturbation of the *whole query batch* of joint L2 norm (over all its
pixels) at most the radius, which includes perturbing example i alone; for
uncoupled models it is Cohen et al.'s per-example certificate.

Noise copy j of a batch is drawn from ``fold_in(key, j)``, so the counts do
not depend on how many copies are vmapped together (``batch``); the copies
run as a ``lax.scan`` over batches of ``batch`` vmapped copies. Inputs are
not clipped to the pixel range (as in Cohen et al.).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import betainc
from jax.scipy.stats import norm

from advmaml.adversary.attacks import LogitsFn
from advmaml.learners.base import FewShotLearner as Learner, adapt_key
from advmaml.eval.robust_eval import metric_key

_BISECTION_STEPS = 40   # halvings of [0, 1]: width 2^-40, far below float32's betainc error


@dataclasses.dataclass(frozen=True)
class SmoothingConfig:
  """CERTIFY's settings (hashable: a static jit argument).

  Attributes:
    sigma: noise standard deviation (pixels in [0, 1]).
    n0: noise samples that choose the class.
    n: noise samples that estimate its probability.
    alpha: failure probability of the certificate.
    batch: noisy copies vmapped together (memory, not results).
    radii: L2 radii at which certified accuracy is reported.
  """

  sigma: float = 0.25
  n0: int = 100
  n: int = 1000
  alpha: float = 0.001
  batch: int = 100
  radii: tuple[float, ...] = (0.125, 0.25, 0.5)

  def __post_init__(self):
    if not (math.isfinite(self.sigma) and self.sigma > 0):
      raise ValueError(f"sigma must be > 0, got {self.sigma}")
    if self.n0 < 1 or self.n < 1 or self.batch < 1:
      raise ValueError("n0, n and batch must be >= 1")
    if not 0 < self.alpha < 1:
      raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
    if any(not math.isfinite(r) or r < 0 for r in self.radii):
      raise ValueError(f"radii must be finite and >= 0, got {self.radii}")

  def max_radius(self) -> float:
    """The largest radius n samples can certify: pA_lower for nA = n is alpha^(1/n)
    (0 when that is <= 1/2: every example abstains)."""
    p = self.alpha ** (1.0 / self.n)
    return self.sigma * float(norm.ppf(p)) if p > 0.5 else 0.0


class Certificate(NamedTuple):
  """Output of :func:`certify`, each (B,).

  Attributes:
    prediction: int32 class of the smoothed classifier, -1 where it abstains.
    radius: certified L2 radius, 0 where it abstains.
    p_lower: the Clopper-Pearson lower bound on the class's probability.
  """

  prediction: jax.Array
  radius: jax.Array
  p_lower: jax.Array


def clopper_pearson_lower(k, n, alpha) -> jax.Array:
  """One-sided (1 - alpha) lower confidence bound on a binomial probability.

  k successes of n trials (arrays, broadcast): the alpha quantile of
  Beta(k, n - k + 1), found by bisection on its CDF ``betainc`` (jittable;
  jax.scipy has no beta quantile), and 0 for k = 0. This is
  ``proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]``, Cohen et
  al.'s bound.
  """
  k = jnp.asarray(k, jnp.float32)
  n = jnp.asarray(n, jnp.float32)
  a, b = jnp.maximum(k, 1.0), n - k + 1.0   # a = 1 where k = 0: any valid value, masked below
  lo = jnp.zeros(jnp.broadcast_shapes(k.shape, n.shape), jnp.float32)

  def halve(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    below = betainc(a, b, mid) < alpha   # the CDF increases in x
    return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

  lo, hi = lax.fori_loop(0, _BISECTION_STEPS, halve, (lo, jnp.ones_like(lo)))
  return jnp.where(k > 0, 0.5 * (lo + hi), 0.0)


def sample_counts(logits_fn: LogitsFn, params, x: jax.Array, key: jax.Array, *, sigma: float,
                  num: int, batch: int) -> jax.Array:
  """(B, K) int32: per example, how often each class wins over ``num`` noisy copies.

  x: (B, H, W, C); copy j is the batch x + sigma * N(0, I) from fold_in(key, j).
  """
  num_classes = jax.eval_shape(logits_fn, params, x).shape[-1]

  def one(j):  # copy j -> (B, K) one-hot prediction
    noisy = x + sigma * jax.random.normal(jax.random.fold_in(key, j), x.shape, x.dtype)
    return jax.nn.one_hot(jnp.argmax(logits_fn(params, noisy), -1), num_classes, dtype=jnp.int32)

  def body(counts, start):
    idx = start + jnp.arange(batch)
    hits = jax.vmap(one)(idx)                              # (batch, B, K)
    return counts + jnp.sum(jnp.where((idx < num)[:, None, None], hits, 0), 0), None

  starts = jnp.arange(0, num, batch)
  counts0 = jnp.zeros((x.shape[0], num_classes), jnp.int32)
  return lax.scan(body, counts0, starts)[0]


def certify(cfg: SmoothingConfig, logits_fn: LogitsFn, params, x: jax.Array,
            key: jax.Array) -> Certificate:
  """Cohen et al.'s CERTIFY for every example of the batch x (B, H, W, C).

  Selection samples use ``fold_in(key, 0)``, estimation samples ``fold_in(key, 1)``.
  """
  params, x = lax.stop_gradient(params), lax.stop_gradient(x)
  counts = functools.partial(sample_counts, logits_fn, params, x, sigma=cfg.sigma, batch=cfg.batch)
  top = jnp.argmax(counts(jax.random.fold_in(key, 0), num=cfg.n0), -1)           # (B,)
  hits = jnp.take_along_axis(counts(jax.random.fold_in(key, 1), num=cfg.n), top[:, None], -1)[:, 0]
  p_lower = clopper_pearson_lower(hits, cfg.n, cfg.alpha)
  certified = p_lower > 0.5
  radius = jnp.where(certified, cfg.sigma * norm.ppf(jnp.where(certified, p_lower, 0.75)), 0.0)
  return Certificate(jnp.where(certified, top, -1).astype(jnp.int32), radius, p_lower)


def certified_metrics(learner: Learner, meta_params: dict, episode, key: jax.Array, *,
                      cfg: SmoothingConfig) -> dict:
  """Per-episode metrics (an ``EpisodeMetricFn``): adapt on the clean support
  set, certify every query example of the adapted model.

  Returns scalars clean_accuracy (the base classifier), smoothed_accuracy
  (g's prediction is the label; abstentions count as wrong),
  abstention_rate, certified_accuracy@<r> per radius (right and certified at
  radius >= r) and mean_certified_radius (the radius where right, else 0).
  """
  fast = learner.adapt(meta_params, episode.support_x, episode.support_y, adapt_key(key))
  qy = episode.query_y
  cert = certify(cfg, learner.logits, fast, episode.query_x, key)
  right = cert.prediction == qy
  mean = lambda v: jnp.mean(v.astype(jnp.float32))
  out = {"clean_accuracy": mean(jnp.argmax(learner.logits(fast, episode.query_x), -1) == qy),
         "smoothed_accuracy": mean(right), "abstention_rate": mean(cert.prediction < 0),
         "mean_certified_radius": mean(jnp.where(right, cert.radius, 0.0))}
  for r in cfg.radii:
    out[metric_key(r, "certified_accuracy")] = mean(right & (cert.radius >= r))
  return out


@functools.lru_cache(maxsize=None)
def make_metric_fn(cfg: SmoothingConfig):
  """A hashable metric_fn for ``evaluate_episodes`` (cached: jit reuses it)."""
  return functools.partial(certified_metrics, cfg=cfg)


__all__ = ["SmoothingConfig", "Certificate", "clopper_pearson_lower", "sample_counts", "certify",
           "certified_metrics", "make_metric_fn"]
