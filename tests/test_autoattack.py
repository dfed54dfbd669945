"""Tests for AutoAttack's parts (advmaml.adversary.square, advmaml.adversary.fab, advmaml.adversary.autoattack).

Linear models give closed forms: for logits x.W + b and box-free inputs, the
smallest L-inf (L2) perturbation that makes class j beat y has norm
(z_y - z_j) / ||w_y - w_j||_1 (/ ||.||_2), and the worst case in the L-inf
ball of radius eps lowers z_y - z_j by eps ||w_y - w_j||_1. Each test jits one
function (the suite is compile-bound).
"""

import jax
import jax.numpy as jnp
import numpy as np

from advmaml.adversary import attacks as A
from advmaml.adversary import autoattack as AA
from advmaml.adversary.attacks import AttackConfig
from advmaml.adversary.fab import FabConfig, fab, project_hyperplane
from advmaml.adversary.square import SquareConfig, bump, p_schedule, square, window_side

HW = (4, 4, 1)
D = 16


def linear_logits(params, x):
  return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


def _linear(seed, n, classes, low=0.4, high=0.6):
  """Random linear model; inputs in [low, high]; labels its clean predictions."""
  rng = np.random.default_rng(seed)
  params = {"w": rng.normal(size=(D, classes)).astype(np.float32),
            "b": (0.1 * rng.normal(size=classes)).astype(np.float32)}
  x = rng.uniform(low, high, (n,) + HW).astype(np.float32)
  y = np.argmax(np.asarray(linear_logits(params, x)), -1).astype(np.int32)
  return params, x, y


def _pair_distances(params, x, y, norm):
  """(n, K): the distance to the boundary of y against each class j (inf for j = y)."""
  w = np.float64(params["w"])
  z = np.float64(x.reshape(x.shape[0], -1)) @ w + np.float64(params["b"])
  idx = np.arange(y.shape[0])
  v = w[:, y].T[:, :, None] - w[None]  # (n, D, K): w_y - w_j
  dual = np.abs(v).sum(1) if norm == "linf" else np.sqrt((v ** 2).sum(1))
  gap = z[idx, y][:, None] - z
  d = gap / np.maximum(dual, 1e-12)
  d[idx, y] = np.inf
  return d


def test_hyperplane_projection_closed_forms():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(6, D)).astype(np.float32)
  c = np.float32([0.3, -0.2, 0.0, 1.0, -0.5, 50.0])
  wide = np.full((6, D), 10.0, np.float32)
  box_lo, box_hi = np.full((6, D), -0.05, np.float32), np.full((6, D), 0.05, np.float32)

  @jax.jit
  def go(w, c, wide, box_lo, box_hi):
    return ([project_hyperplane(w, c, -wide, wide, n) for n in ("linf", "l2")],
            [project_hyperplane(w, c, box_lo, box_hi, n) for n in ("linf", "l2")])

  (linf, l2), boxed = go(w, c, wide, box_lo, box_hi)
  w64, c64 = np.float64(w), np.float64(c)[:, None]
  # Without a binding box: c / ||w||_1 sign(w) and c w / ||w||_2^2.
  np.testing.assert_allclose(linf[:5], (c64 * np.sign(w64) / np.abs(w64).sum(1, keepdims=True))[:5],
                             atol=1e-6)
  np.testing.assert_allclose(l2[:5], (c64 * w64 / (w64 ** 2).sum(1, keepdims=True))[:5], atol=1e-6)
  for d in boxed:
    assert np.all(np.abs(d) <= 0.05 + 1e-7)
    reached = np.sum(w64 * d, 1)
    feasible = np.abs(c) <= np.abs(w64).sum(1) * 0.05
    np.testing.assert_allclose(reached[feasible], c64[feasible, 0], atol=1e-5)
  # Out of reach (c = 50): every coordinate at its bound, towards the plane.
  np.testing.assert_allclose(boxed[0][5], 0.05 * np.sign(w[5]), atol=1e-7)


def test_fab_reaches_the_minimum_norm_and_judges_at_epsilon():
  """Binary linear model: FAB's closest adversarial point is within its
  overshoot (eta = 1.05) of the closed-form minimum, for L-inf and L2, and an
  example counts as broken iff that minimum is below epsilon."""
  params, x, y = _linear(1, 32, 2)
  cases = []
  for norm in ("linf", "l2"):
    dist = _pair_distances(params, x, y, norm)[np.arange(32), 1 - y]
    cases.append((norm, dist, float(np.median(dist))))
  cfgs = [FabConfig(norm=n, epsilon=e, steps=s) for n, _, e in cases for s in (2, 20)]

  @jax.jit
  def go(params, x, y, key):
    return [fab(c, linear_logits, params, x, y, key, 1 - y) for c in cfgs]

  res = jax.device_get(go(params, x, y, jax.random.key(2)))
  for i, (norm, dist, eps) in enumerate(cases):
    for r, c in zip(res[2 * i:2 * i + 2], cfgs[2 * i:2 * i + 2]):
      ratio = r.norm / dist
      assert np.all(ratio >= 1 - 1e-4) and np.all(ratio <= 1.05), (c, ratio)
      decided = np.abs(dist - eps) > 1e-4
      np.testing.assert_array_equal(r.correct[decided], (dist > eps)[decided])
      n = np.asarray(A.perturbation_norm(r.x_adv - x, norm))
      assert np.all(n <= eps + 1e-5) and r.x_adv.min() >= 0 and r.x_adv.max() <= 1
      assert 0 < r.correct.mean() < 1


def test_square_schedule_and_closed_form():
  """p halves at 10, 50, 200, ... of 10,000 queries (rescaled); on a binary
  linear model the random search ends at the worst vertex of the ball for
  every example that stays correct, and breaks exactly the others; robust
  accuracy falls with the query budget."""
  queries = np.array([1, 10, 11, 50, 51, 9000], np.int32)
  schedule = jax.jit(p_schedule, static_argnums=(0, 2))
  np.testing.assert_allclose(schedule(0.8, queries, 10000),
                             [0.8, 0.8, 0.4, 0.4, 0.2, 0.8 / 512], rtol=1e-6)
  np.testing.assert_allclose(schedule(0.8, queries[:2] // 2 + 1, 5000),
                             [0.8, 0.4], rtol=1e-6)  # queries 1 and 6 of 5000
  np.testing.assert_array_equal(jax.jit(window_side, static_argnums=(1, 2))(
      np.float32([0.8, 0.05, 1e-4]), 28, 28), [25, 6, 1])
  params, x, y = _linear(3, 32, 2)
  eps = 0.05
  dist = _pair_distances(params, x, y, "linf")[np.arange(32), 1 - y]
  budgets = (3, 30, 1000)

  @jax.jit
  def go(params, x, y, key):
    return [square(SquareConfig(epsilon=eps, queries=q), linear_logits, params, x, y, key)
            for q in budgets]

  res = jax.device_get(go(params, x, y, jax.random.key(4)))
  acc = [float(r.correct.mean()) for r in res]
  assert acc[0] >= acc[1] >= acc[2] and acc[0] > acc[2], acc
  last = res[-1]
  np.testing.assert_array_equal(last.correct, dist > eps)
  w = params["w"][:, 0] - params["w"][:, 1]
  v = np.where(y[:, None] == 0, w, -w)
  robust = last.correct
  np.testing.assert_allclose(last.x_adv.reshape(32, D)[robust],
                             (x.reshape(32, D) - eps * np.sign(v))[robust], atol=1e-6)
  for r in res:
    assert np.abs(r.x_adv - x).max() <= eps + 1e-6 and r.x_adv.min() >= 0 and r.x_adv.max() <= 1


def _bump_reference(s):
  """The L2 window's bump, built as published: nested squares added one by one."""
  def rectangle(a, b):
    d = np.zeros((a, b))
    ci, cj = a // 2, b // 2
    for k in range(max(ci, cj) + 1):
      d[max(ci - k, 0):min(ci + k + 1, a), max(cj - k, 0):min(cj + k + 1, b)] += 1.0 / (k + 1) ** 2
    return d / np.sqrt((d ** 2).sum())

  d = np.zeros((s, s))
  d[:s // 2], d[s // 2:] = rectangle(s // 2, s), -rectangle(s - s // 2, s)
  return d / np.sqrt((d ** 2).sum())


def test_square_l2_bump_and_soundness():
  """The L2 bump (closed form per pixel, traced size) against the loop
  construction; on a linear model L2 Square stays on or in the epsilon
  sphere, never breaks an example the closed form says is robust, and
  breaks more with more queries."""
  i, j = np.meshgrid(np.arange(12), np.arange(12), indexing="ij")
  sides = np.array([3, 4, 5, 8, 11], np.int32)
  got = jax.jit(jax.vmap(lambda s: bump(i, j, s, 12)))(sides)
  for s, g in zip(sides, np.asarray(got)):
    ref = np.zeros((12, 12))
    ref[:s, :s] = _bump_reference(int(s))
    np.testing.assert_allclose(g, ref, atol=1e-6)
  rng = np.random.default_rng(9)
  hw, d = (8, 8, 1), 64
  params = {"w": rng.normal(size=(d, 2)).astype(np.float32), "b": np.zeros(2, np.float32)}
  x = rng.uniform(0.3, 0.7, (32,) + hw).astype(np.float32)
  y = np.argmax(np.asarray(linear_logits(params, x)), -1).astype(np.int32)
  dist = _pair_distances(params, x, y, "l2")[np.arange(32), 1 - y]
  eps = float(np.median(dist))
  budgets = (10, 100, 1000)

  @jax.jit
  def go(params, x, y, key):
    return [square(SquareConfig(norm="l2", epsilon=eps, queries=q), linear_logits, params, x, y,
                   key) for q in budgets]

  res = jax.device_get(go(params, x, y, jax.random.key(10)))
  acc = [float(r.correct.mean()) for r in res]
  assert acc[0] >= acc[1] >= acc[2] and acc[0] > acc[2] >= np.mean(dist > eps), acc
  for r in res:
    assert np.all(r.correct[dist > eps + 1e-4])
    n = np.asarray(A.perturbation_norm(r.x_adv - x, "l2"))
    assert np.all(n <= eps * (1 + 1e-5)) and r.x_adv.min() >= 0 and r.x_adv.max() <= 1


def test_autoattack_on_a_linear_model():
  """5 classes: robust iff every other class stays behind in the worst case
  of the ball; AutoAttack's cumulative accuracy never rises over its parts,
  equals that closed form, equals the per-example worst case of its parts
  run alone (cascade off, same keys), and is 0 at epsilon 1; the L2 version
  against the L2 closed form."""
  params, x, y = _linear(5, 40, 5, 0.3, 0.7)
  eps = 0.03
  dist = _pair_distances(params, x, y, "linf").min(1)
  cfg = AA.AutoAttackConfig(epsilon=eps, steps=10, targets=9, square_queries=200)
  alone = AA.AutoAttackConfig(epsilon=eps, steps=10, targets=9, square_queries=200, cascade=False)
  big = AA.AutoAttackConfig(epsilon=1.0, steps=10, square_queries=50)
  dist_l2 = _pair_distances(params, x, y, "l2").min(1)
  eps_l2 = float(np.median(dist_l2))
  l2 = AA.AutoAttackConfig(norm="l2", epsilon=eps_l2, steps=30, square_queries=50)
  # Class c's logit is the sum of quadrant c: every class region meets the
  # box, so at epsilon 1 every example can be broken.
  quadrant = np.zeros((4, 4), np.int32)
  quadrant[:2, 2:], quadrant[2:, :2], quadrant[2:, 2:] = 1, 2, 3
  quad = {"w": np.eye(4, dtype=np.float32)[quadrant.reshape(-1)], "b": np.zeros(4, np.float32)}
  y_quad = np.argmax(np.asarray(linear_logits(quad, x)), -1).astype(np.int32)

  @jax.jit
  def go(params, x, y, quad, y_quad, key):
    parts = [
        A.attack(alone.apgd("ce"), linear_logits, params, x, y, jax.random.fold_in(key, 0)),
        AA.apgd_targeted(alone.apgd("dlr", targeted=True), linear_logits, params, x, y,
                         jax.random.fold_in(key, 1), targets=4),
        AA.fab_targeted(alone.fab(), linear_logits, params, x, y, jax.random.fold_in(key, 2),
                        targets=4),
        square(alone.square(), linear_logits, params, x, y, jax.random.fold_in(key, 3)),
    ]
    return (AA.autoattack(cfg, linear_logits, params, x, y, key),
            AA.autoattack(alone, linear_logits, params, x, y, key),
            [p.correct for p in parts],
            AA.autoattack(big, linear_logits, quad, x, y_quad, key),
            AA.autoattack(l2, linear_logits, params, x, y, key))

  cascade, uncascaded, parts, full, in_l2 = jax.device_get(go(params, x, y, quad, y_quad,
                                                              jax.random.key(6)))
  cum = cascade.cumulative.mean(1)
  assert np.all(np.diff(cum) <= 0) and cum[0] <= 1.0, cum
  decided = np.abs(dist - eps) > 1e-4
  np.testing.assert_array_equal(cascade.correct[decided], (dist > eps)[decided])
  assert 0 < cascade.correct.mean() < 1
  np.testing.assert_array_equal(uncascaded.part_correct, np.stack(parts))
  np.testing.assert_array_equal(uncascaded.cumulative, np.logical_and.accumulate(np.stack(parts)))
  np.testing.assert_array_equal(uncascaded.correct, cascade.correct)
  assert not np.any(full.correct)
  assert np.abs(cascade.x_adv - x).max() <= eps + 1e-6
  decided = np.abs(dist_l2 - eps_l2) > 1e-4
  np.testing.assert_array_equal(in_l2.correct[decided], (dist_l2 > eps_l2)[decided])
  assert np.all(np.asarray(A.perturbation_norm(in_l2.x_adv - x, "l2")) <= eps_l2 * (1 + 1e-5))


def mlp_bn_logits(params, x):
  """One hidden layer normalised over the batch: the rows are coupled."""
  h = x.reshape(x.shape[0], -1) @ params["w1"]
  h = (h - h.mean(0)) * jax.lax.rsqrt(h.var(0) + 1e-5)
  return jax.nn.relu(h) @ params["w2"]


def test_autoattack_on_a_batch_coupled_model_stays_admissible():
  """With batch norm, every part's reported point stays in the ball and the
  box, FAB's and Square's included, robust accuracy falls over the parts
  from at most clean accuracy, and more FAB restarts or APGD-T targets never
  raise it."""
  rng = np.random.default_rng(7)
  params = {"w1": rng.normal(size=(D, 16)).astype(np.float32) / 4,
            "w2": rng.normal(size=(16, 4)).astype(np.float32) / 4}
  x = rng.uniform(0, 1, (12,) + HW).astype(np.float32)
  y = np.argmax(np.asarray(mlp_bn_logits(params, x)), -1).astype(np.int32)
  y[:3] = (y[:3] + 1) % 4  # some examples wrong from the start
  eps = 0.1
  cfg = AA.AutoAttackConfig(epsilon=eps, steps=5, square_queries=30)

  fab3 = FabConfig(epsilon=eps, steps=5, restarts=3)
  apgd_t = cfg.apgd("dlr", targeted=True)

  @jax.jit
  def go(params, x, y, key):
    return (AA.autoattack(cfg, mlp_bn_logits, params, x, y, key),
            AA.fab_targeted(cfg.fab(), mlp_bn_logits, params, x, y, key, targets=3),
            square(cfg.square(), mlp_bn_logits, params, x, y, key),
            AA.fab_targeted(fab3, mlp_bn_logits, params, x, y, key, targets=3),
            [AA.apgd_targeted(apgd_t, mlp_bn_logits, params, x, y, key, targets=t).correct
             for t in (1, 3)])

  auto, fab_t, sq, fab_t3, (one_target, three_targets) = jax.device_get(
      go(params, x, y, jax.random.key(8)))
  for r in (auto, fab_t, sq):
    assert np.abs(r.x_adv - x).max() <= eps + 1e-6 and r.x_adv.min() >= 0 and r.x_adv.max() <= 1
    assert not np.any(r.correct[:3])
  cum = auto.cumulative
  assert np.all(cum[1:] <= cum[:-1]) and not np.any(cum[:, :3])
  assert auto.correct.mean() < 0.75  # the attacks do something
  # More restarts, more targets: supersets of the evaluated batches.
  assert np.all(fab_t3.correct <= fab_t.correct) and np.all(three_targets <= one_target)
