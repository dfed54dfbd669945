"""The Crammer-Singer dual solver (advmaml/learners/qp.py) against independent solvers,
its implicit gradient against finite differences and unrolling, and vmap/jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from advmaml.learners import qp


def random_problem(seed, s_per_class=2, n_way=3, dim=4, scale=1.0):
  """Features X (S, D) of n_way noisy clusters, labels (S,), one-hot Y (S, N); float64 numpy."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(n_way), s_per_class)
  centres = rng.normal(size=(n_way, dim))
  x = scale * (centres[labels] + 0.8 * rng.normal(size=(labels.size, dim)))
  return x, labels, np.eye(n_way)[labels]


def scipy_dual(gram, targets, C, ridge):
  """The same dual, by SLSQP with the constraints written out (alpha <= C Y, rows sum to 0)."""
  s, n = targets.shape
  h = gram + ridge * np.eye(s)
  fun = lambda a: 0.5 * np.sum(a.reshape(s, n) * (h @ a.reshape(s, n))) - a @ targets.ravel()
  jac = lambda a: (h @ a.reshape(s, n) - targets).ravel()
  cons = [{"type": "eq", "fun": lambda a: a.reshape(s, n).sum(1),
           "jac": lambda a: np.kron(np.eye(s), np.ones((1, n)))},
          {"type": "ineq", "fun": lambda a: C * targets.ravel() - a,
           "jac": lambda a: -np.eye(s * n)}]
  res = scipy.optimize.minimize(fun, np.zeros(s * n), jac=jac, constraints=cons,
                                method="SLSQP", options={"ftol": 1e-15, "maxiter": 2000})
  assert res.success, res.message
  return res.x.reshape(s, n), res.fun


def scipy_primal(x, labels, n_way, C, ridge):
  """The primal Crammer-Singer SVM of the features [x_i, sqrt(r) e_i], by SLSQP.

  min 1/2 ||W||^2 + 1/2 ||V||^2 + C sum xi  s.t.  for all i, n:
  (w_{y_i} - w_n) . x_i + sqrt(r) (V[i, y_i] - V[i, n]) >= 1 - [n = y_i] - xi_i.
  Returns (W (D, N), objective).
  """
  s, d = x.shape
  size_w, size_v = d * n_way, s * n_way

  def unpack(z):
    return z[:size_w].reshape(d, n_way), z[size_w:size_w + size_v].reshape(s, n_way), z[-s:]

  def fun(z):
    w, v, xi = unpack(z)
    return 0.5 * (w ** 2).sum() + 0.5 * (v ** 2).sum() + C * xi.sum()

  def margins(z):
    w, v, xi = unpack(z)
    scores = x @ w + np.sqrt(ridge) * v                       # (S, N)
    own = scores[np.arange(s), labels][:, None]
    return (own - scores - (1 - np.eye(n_way)[labels]) + xi[:, None]).ravel()

  res = scipy.optimize.minimize(fun, np.zeros(size_w + size_v + s), constraints=[
      {"type": "ineq", "fun": margins}], method="SLSQP",
      options={"ftol": 1e-14, "maxiter": 3000})
  assert res.success, res.message
  return unpack(res.x)[0], res.fun


def bisection_projection(v, total):
  """Simplex projection by bisection on the threshold theta: sum max(v - theta, 0) = total."""
  lo, hi = v.min() - total, v.max()
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if np.maximum(v - mid, 0).sum() > total else (lo, mid)
  return np.maximum(v - 0.5 * (lo + hi), 0)


def test_simplex_projection_matches_bisection(x64):
  rng = np.random.default_rng(0)
  v = rng.normal(size=(50, 5)) * rng.choice([0.01, 1.0, 10.0], size=(50, 1))
  for total in (0.1, 1.0, 3.0):
    got = np.asarray(qp.project_simplex(jnp.asarray(v), total))
    want = np.stack([bisection_projection(row, total) for row in v])
    np.testing.assert_allclose(got, want, atol=1e-12)
    np.testing.assert_allclose(got.sum(-1), total, rtol=1e-12)


@pytest.mark.parametrize("C", [0.05, 1.0, 10.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dual_solution_matches_slsqp(x64, C, seed):
  x, _, y = random_problem(seed)
  gram = x @ x.T
  alpha = np.asarray(qp.crammer_singer(jnp.asarray(gram), jnp.asarray(y), C=C, iterations=400))
  want, want_value = scipy_dual(gram, y, C, 1.0)
  value = float(qp.dual_objective(jnp.asarray(alpha), gram, y, 1.0))
  # Feasible, the same objective (SLSQP's own accuracy ~1e-9) and the same point.
  assert np.all(alpha <= C * y + 1e-12)
  np.testing.assert_allclose(alpha.sum(1), 0, atol=1e-12)
  assert abs(value - want_value) < 1e-9 * max(1, abs(want_value))
  np.testing.assert_allclose(alpha, want, atol=1e-6)


def test_dual_solution_is_the_primal_svm(x64):
  """Strong duality with the primal SVM of [x, sqrt(r) e_i]: W = X^T alpha, equal optima.
  C=0.3 leaves some examples inside the margin (alpha at its bound C) and some not."""
  x, labels, y = random_problem(3, s_per_class=3, dim=3, scale=0.7)
  C, ridge = 0.3, 0.5
  alpha = np.asarray(qp.crammer_singer(jnp.asarray(x @ x.T), jnp.asarray(y), C=C, ridge=ridge,
                                       iterations=1000))
  at_bound = np.isclose(alpha[y > 0], C).sum()
  assert 0 < at_bound < len(labels)
  w, primal_value = scipy_primal(x, labels, 3, C, ridge)
  dual_value = float(qp.dual_objective(jnp.asarray(alpha), x @ x.T, y, ridge))
  assert abs(primal_value + dual_value) < 1e-7
  np.testing.assert_allclose(x.T @ alpha, w, atol=1e-5)


def query_loss(x, y, xq, yq, *, C, iterations, implicit, scale=1.0):
  """Cross-entropy of queries xq (B, D) scored by the SVM fitted on x (S, D)."""
  alpha = qp.crammer_singer(x @ x.T, y, C=C, iterations=iterations, implicit=implicit)
  logits = scale * (xq @ x.T @ alpha)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yq[:, None], 1))


@pytest.mark.parametrize("C", [0.1, 1.0])
def test_implicit_gradient_matches_finite_differences_and_unrolling(x64, C):
  x, _, y = random_problem(4, s_per_class=2, dim=5)
  xq, yq, _ = random_problem(5, s_per_class=2, dim=5)
  x, y, xq, yq = map(jnp.asarray, (x, y, xq, yq))
  loss = lambda x, scale, implicit=True, iterations=300: query_loss(
      x, y, xq, yq, C=C, iterations=iterations, implicit=implicit, scale=scale)
  alpha = np.asarray(qp.crammer_singer(x @ x.T, y, C=C, iterations=300))
  assert np.any(np.isclose(alpha, 0) & (np.asarray(y) == 0))   # an active face to differentiate on
  grad_x, grad_scale = jax.grad(loss, argnums=(0, 1))(x, 1.5)
  unrolled_x, unrolled_scale = jax.grad(lambda a, b: loss(a, b, implicit=False), (0, 1))(x, 1.5)
  eps = 1e-6
  steps = jnp.eye(x.size).reshape(-1, *x.shape) * eps
  f = jax.jit(jax.vmap(lambda e: loss(x + e, 1.5, iterations=2000)))
  fd_x = ((f(steps) - f(-steps)) / (2 * eps)).reshape(x.shape)
  fd_scale = (loss(x, 1.5 + eps, iterations=2000) - loss(x, 1.5 - eps, iterations=2000)) / (2 * eps)
  scale = float(jnp.abs(fd_x).max())
  assert scale > 1e-3
  np.testing.assert_allclose(grad_x, fd_x, atol=1e-7 * scale + 1e-9)
  np.testing.assert_allclose(unrolled_x, grad_x, atol=1e-7 * scale + 1e-9)
  np.testing.assert_allclose(grad_scale, fd_scale, rtol=1e-6)
  np.testing.assert_allclose(unrolled_scale, grad_scale, rtol=1e-8)


def test_vmap_and_jit_over_tasks_match_single_solves(x64):
  problems = [random_problem(seed) for seed in range(4)]
  grams = jnp.stack([jnp.asarray(x @ x.T) for x, _, _ in problems])
  targets = jnp.stack([jnp.asarray(y) for _, _, y in problems])
  solve = lambda g, t: qp.crammer_singer(g, t, C=1.0, iterations=100)
  batched = jax.jit(jax.vmap(solve))(grams, targets)
  for i in range(4):
    np.testing.assert_allclose(batched[i], solve(grams[i], targets[i]), atol=1e-12)
  # The implicit backward vmaps too: per-task gradients of a per-task scalar.
  grads = jax.jit(jax.vmap(jax.grad(lambda g, t: jnp.sum(solve(g, t) ** 2))))(grams, targets)
  assert grads.shape == grams.shape and bool(jnp.all(jnp.isfinite(grads)))
  np.testing.assert_allclose(grads[2], jax.grad(lambda g: jnp.sum(solve(g, targets[2]) ** 2))(
      grams[2]), atol=1e-12)


@pytest.mark.parametrize("n_way,shots", [(5, 1), (5, 5), (20, 1)])
def test_default_iterations_reach_float32_accuracy_on_relu_features(x64, n_way, shots):
  """50 float32 iterations (the meta-training default) on post-ReLU features of Conv4's
  size (D = 256, large positive correlations: the ill-conditioned case) against a
  long float64 run: a solution within 1e-3 of the largest entry."""
  rng = np.random.default_rng(n_way + shots)
  base = np.abs(rng.normal(size=(n_way, 256)))
  x = np.maximum(np.repeat(base, shots, 0) + 0.7 * rng.normal(size=(n_way * shots, 256)), 0)
  y = np.eye(n_way)[np.repeat(np.arange(n_way), shots)]
  want = np.asarray(qp.crammer_singer(jnp.asarray(x @ x.T), jnp.asarray(y), C=0.1,
                                      iterations=2000))
  x32 = jnp.asarray(x, jnp.float32)   # explicitly float32: computed in float32 under x64 too
  got = np.asarray(qp.crammer_singer(x32 @ x32.T, jnp.asarray(y, jnp.float32), C=0.1,
                                     iterations=50))
  assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()


def test_rejects_bad_settings():
  g, t = jnp.eye(2), jnp.eye(2)
  with pytest.raises(ValueError, match="positive"):
    qp.crammer_singer(g, t, C=0.0)
  with pytest.raises(ValueError, match="iterations"):
    qp.crammer_singer(g, t, C=1.0, iterations=0)
