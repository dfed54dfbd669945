"""Randomized smoothing: the Clopper-Pearson bound, CERTIFY against the closed
form of a linear classifier, abstention on the boundary, and the entry point.

A linear binary classifier f(x) = [w.x + b > 0] under N(0, sigma^2 I) noise
has P(f(x + e) = 1) = Phi((w.x + b) / (sigma ||w||)), so the smoothed
classifier is f itself and its exact certified radius, sigma * Phi^-1(pA), is
the distance |w.x + b| / ||w|| to the hyperplane.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from advmaml.eval import smoothing
from conftest import run_module as _run

SIGMA = 0.25


def test_clopper_pearson_matches_the_beta_quantile():
  k = np.array([0, 1, 5, 10, 500, 990, 1000, 9990])
  n = np.array([10, 10, 10, 10, 1000, 1000, 1000, 10000])
  for alpha in (0.001, 0.05):
    got = np.asarray(jax.jit(smoothing.clopper_pearson_lower)(k, n, alpha))
    want = np.where(k > 0, stats.beta.ppf(alpha, np.maximum(k, 1), n - k + 1), 0.0)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3)
  # Exact small case: k = n gives alpha^(1/n).
  assert float(smoothing.clopper_pearson_lower(4, 4, 0.0625)) == pytest.approx(0.5, abs=1e-5)


def linear_model(d=16, seed=0):
  """(params, logits_fn): two classes, logit 1 - logit 0 = w.x + b; x (B, 4, 4, 1)."""
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.normal(size=d), jnp.float32)
  b = jnp.float32(0.1)
  logits = lambda p, x: jnp.stack([jnp.zeros(x.shape[0]), x.reshape(x.shape[0], -1) @ p[0] + p[1]], -1)
  return (w, b), logits


def points_at(params, distances, seed=1):
  """(B, 4, 4, 1) points at signed distances from the hyperplane (> 0: class 1)."""
  w, b = params
  rng = np.random.default_rng(seed)
  x = rng.uniform(size=(len(distances), 16)).astype(np.float32)
  unit = w / jnp.linalg.norm(w)
  x = x - ((x @ w + b) / jnp.linalg.norm(w))[:, None] * unit   # onto the plane
  return (x + jnp.asarray(distances, jnp.float32)[:, None] * unit).reshape(-1, 4, 4, 1)


def test_certificate_approaches_the_closed_form_and_never_exceeds_it():
  params, logits = linear_model()
  distances = np.array([0.05, 0.15, 0.3, 0.6, -0.3, -0.6], np.float32)
  x = points_at(params, distances)
  labels = (distances > 0).astype(np.int32)
  gaps = []
  for n in (100, 1000, 10000):
    cfg = smoothing.SmoothingConfig(sigma=SIGMA, n0=100, n=n, alpha=0.001, batch=500)
    cert = jax.jit(smoothing.certify, static_argnums=(0, 1))(cfg, logits, params, x,
                                                             jax.random.key(n))
    radius = np.asarray(cert.radius)
    certified = np.asarray(cert.prediction) >= 0
    # A certificate is for the true class and never beyond the exact radius (1 - alpha).
    assert (np.asarray(cert.prediction)[certified] == labels[certified]).all()
    assert (radius <= np.abs(distances) + 1e-4).all(), (n, radius)
    assert radius.max() <= cfg.max_radius() + 1e-5
    gaps.append(np.abs(distances) - radius)
  gaps = np.stack(gaps)
  assert (np.diff(gaps, axis=0) <= 1e-3).all(), gaps   # more samples, tighter certificates
  # With 10^4 samples every point is certified, within 0.05 of its exact radius (pA's bound
  # is then within about 3 standard errors of pA).
  assert (gaps[-1] < 0.05).all() and (gaps[-1] >= -1e-4).all(), gaps[-1]
  # An independent path: the closed-form pA, its expected count n * pA, scipy's beta
  # quantile. The Monte Carlo radius agrees within ~4 standard errors of the count.
  p_exact = stats.norm.cdf(np.abs(distances) / SIGMA)
  expected = SIGMA * stats.norm.ppf(stats.beta.ppf(0.001, 10000 * p_exact, 10000 * (1 - p_exact) + 1))
  np.testing.assert_allclose(radius, expected, atol=0.03)


def test_abstains_on_the_boundary_and_counts_do_not_depend_on_the_batch():
  params, logits = linear_model()
  x = points_at(params, np.zeros(8, np.float32))
  cfg = smoothing.SmoothingConfig(sigma=SIGMA, n0=50, n=2000, alpha=0.001, batch=256)
  cert = smoothing.certify(cfg, logits, params, x, jax.random.key(0))
  assert (np.asarray(cert.prediction) == -1).all() and (np.asarray(cert.radius) == 0).all()
  assert (np.asarray(cert.p_lower) <= 0.5).all()
  count = lambda batch: np.asarray(smoothing.sample_counts(logits, params, x, jax.random.key(3),
                                                           sigma=SIGMA, num=37, batch=batch))
  c7 = count(7)
  np.testing.assert_array_equal(c7, count(37))
  np.testing.assert_array_equal(c7, count(100))
  assert (c7.sum(-1) == 37).all() and 0 < c7[:, 1].mean() < 37   # both classes win sometimes


def test_config_rejects_bad_values():
  for bad in (dict(sigma=0.0), dict(n0=0), dict(n=0), dict(alpha=1.0), dict(radii=(-0.1,))):
    with pytest.raises(ValueError):
      smoothing.SmoothingConfig(**bad)
  assert smoothing.SmoothingConfig(n=5, alpha=0.001).max_radius() == 0.0   # 0.001^(1/5) < 1/2


def test_certify_entry_point(tiny_run, tmp_path):
  work, env = tiny_run
  common = (f"--workdir={work}", "--episodes=3")
  out = _run("experiments.certify", *common, "--sigma=0.25", "--radii=0,0.25,0.5", "--n0=10",
             "--n=50", "--alpha=0.01", "--sample_batch=16", env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  record = json.loads((work / "certify_test.json").read_text())
  m = record["metrics"]
  assert record["certify"]["n"] == 50 and record["certify"]["radii"] == [0.0, 0.25, 0.5]
  assert m["certified_accuracy@0.25"]["n"] == 3
  at = [m[f"certified_accuracy@{r}"]["mean"] for r in ("0.0", "0.25", "0.5")]
  assert at[0] == pytest.approx(m["smoothed_accuracy"]["mean"])
  assert at[0] >= at[1] >= at[2]
  assert m["smoothed_accuracy"]["mean"] + m["abstention_rate"]["mean"] <= 1 + 1e-6
  # 50 samples at alpha 0.01 certify at most sigma * Phi^-1(0.01^(1/50)) = 0.338: 0.5 is out
  # of reach, and the log says so.
  assert record["certify"]["max_certifiable_radius"] == pytest.approx(
      SIGMA * stats.norm.ppf(0.01 ** (1 / 50)), rel=1e-5)
  assert at[2] == 0.0
  assert "--radii 0.5 exceed 0.338" in out.stderr

  for flag in ("--sigma=0", "--radii=0.5,-1", "--n0=0", "--n=0", "--alpha=1.5", "--n=3"):
    out = _run("experiments.certify", *common, flag, env=env)
    assert out.returncode == 2 and flag.split("=")[0] in out.stderr, out.stderr[-2000:]
    errors = [l for l in out.stderr.splitlines() if l.startswith("error: ")]
    assert "Traceback" not in out.stderr and len(errors) == 1, out.stderr[-2000:]
