"""Tests for advmaml.adversary.attacks.

Compiles dominate the run time on a small CPU, so each test jits one function
that runs all the attacks it compares, and test data come from numpy (every
eager JAX op would be a compile of its own).
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advmaml.adversary import attacks as A
from advmaml.adversary.attacks import AttackConfig

HW = (4, 4, 1)
D = 16


def _rng(seed):
  return np.random.default_rng(seed)


def _f32(a):
  return np.asarray(a, np.float32)


def linear_logits(params, x):
  return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


def mlp_bn_logits(params, x):
  """Tiny MLP with a normalisation over the batch (like batch norm in
  training mode), so the examples of a batch are coupled."""
  h = x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"]
  mu = jnp.mean(h, axis=0)
  var = jnp.var(h, axis=0)
  h = (h - mu) * jax.lax.rsqrt(var + 1e-5) * params["gamma"] + params["beta"]
  return jax.nn.relu(h) @ params["w2"] + params["b2"]


def _np_linear(params, x):
  return x.reshape(x.shape[0], -1) @ np.asarray(params["w"]) + np.asarray(params["b"])


def _toy_data(rng, n_per_class, prototypes):
  """Class prototypes (0.3 / 0.7 pixels) plus uniform noise of +-0.1."""
  y = np.repeat(np.arange(prototypes.shape[0]), n_per_class).astype(np.int32)
  noise = rng.uniform(-0.1, 0.1, (y.shape[0],) + HW)
  return _f32(np.clip(prototypes[y] + noise, 0.0, 1.0)), y


@pytest.fixture(scope="module")
def trained_mlp():
  """MLP-with-batch-norm trained by plain full-batch gradient descent on a
  separable 3-class toy problem. Returns (params, x_test, y_test)."""
  rng = _rng(0)
  num_classes, hidden = 3, 32
  prototypes = 0.5 + 0.2 * rng.choice([-1.0, 1.0], (num_classes,) + HW)
  x_tr, y_tr = _toy_data(rng, 32, prototypes)
  x_te, y_te = _toy_data(rng, 16, prototypes)
  params = {
      "w1": _f32(rng.normal(size=(D, hidden)) / np.sqrt(D)),
      "b1": _f32(np.zeros(hidden)),
      "gamma": _f32(np.ones(hidden)),
      "beta": _f32(np.zeros(hidden)),
      "w2": _f32(rng.normal(size=(hidden, num_classes)) / np.sqrt(hidden)),
      "b2": _f32(np.zeros(num_classes)),
  }

  @jax.jit
  def train(p, x, y):
    def loss(p):
      logp = jax.nn.log_softmax(mlp_bn_logits(p, x))
      return -jnp.mean(jnp.take_along_axis(logp, y[:, None], -1))

    step = lambda _, p: jax.tree.map(lambda a, g: a - 0.2 * g, p, jax.grad(loss)(p))
    p = jax.lax.fori_loop(0, 300, step, p)
    return p, jnp.argmax(mlp_bn_logits(p, x_te), -1)

  params, pred = jax.device_get(train(params, x_tr, y_tr))
  assert np.mean(pred == y_te) >= 0.95
  return params, x_te, y_te


def _run_all(cfgs, logits_fn, params, x, y, key):
  """One compile running each entry: a config, a list of configs (their
  worst_case) or a (config, i) pair (the attack with key fold_in(key, i)).
  Returns (results, clean predictions, predictions on each x_adv batch)."""

  @jax.jit
  def go(params, x, y, key):
    out = []
    for c in cfgs:
      if isinstance(c, list):
        out.append(A.worst_case(c, logits_fn, params, x, y, key))
      elif isinstance(c, tuple):
        k = jax.random.fold_in(key, c[1])
        out.append(A.attack(c[0], logits_fn, params, x, y, k))
      else:
        out.append(A.attack(c, logits_fn, params, x, y, key))
    clean = jnp.argmax(logits_fn(params, x), -1)
    return out, clean, [jnp.argmax(logits_fn(params, r.x_adv), -1) for r in out]

  return jax.device_get(go(params, x, y, key))


# ----------------------------------------------------------------------------
# Unit tests of the pieces.


def test_config_validation_and_step_size():
  with pytest.raises(ValueError):
    AttackConfig(name="cw")
  with pytest.raises(ValueError):
    AttackConfig(norm="l1")
  with pytest.raises(ValueError):
    AttackConfig(loss="hinge")
  with pytest.raises(ValueError):
    AttackConfig(epsilon=-0.1)
  with pytest.raises(ValueError):
    AttackConfig(steps=0)
  assert AttackConfig(epsilon=0.1, steps=10).resolved_step_size() == pytest.approx(0.025)
  assert AttackConfig(name="fgsm", epsilon=0.1).resolved_step_size() == pytest.approx(0.1)
  assert AttackConfig(step_size=0.3).resolved_step_size() == pytest.approx(0.3)


def test_apgd_checkpoints_follow_the_paper():
  # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 (then > 1).
  assert A.apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
  assert A.apgd_checkpoints(10) == [0, 3, 5, 6, 7, 8, 9]


def test_losses_by_hand():
  z = _f32([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 5.0, 1.0]])
  y, t = np.array([1, 2], np.int32), np.array([3, 0], np.int32)
  z2, y2 = z[:, :2], np.array([0, 0], np.int32)

  @jax.jit
  def losses(z, y, t, z2, y2):
    obj = {k: A.attack_objective(z, y, k) for k in ("ce", "margin", "dlr")}
    obj.update({k + "_t": A.attack_objective(z, y, k, t) for k in ("ce", "margin", "dlr")})
    obj["dlr2"] = A.attack_objective(z2, y2, "dlr")
    obj["margin2"] = A.margin_loss(z2, y2)
    return obj

  o = losses(z, y, t, z2, y2)
  logp = z - np.log(np.sum(np.exp(z), -1, keepdims=True))
  np.testing.assert_allclose(o["margin"], [2.0, -3.0])
  np.testing.assert_allclose(o["dlr"], [2.0 / 3.0, -3.0 / 4.0], rtol=1e-6)
  np.testing.assert_allclose(o["ce"], -logp[[0, 1], [1, 2]], rtol=1e-5)
  # Targeted: log p_t, z_t - max_{j != t} z_j, (z_t - z_y) / (z_pi1 - (z_pi3 + z_pi4) / 2).
  np.testing.assert_allclose(o["ce_t"], logp[[0, 1], [3, 0]], rtol=1e-5)
  np.testing.assert_allclose(o["margin_t"], [-4.0, -5.0])
  np.testing.assert_allclose(o["dlr_t"], [-2.0 / 3.5, -5.0 / 4.5], rtol=1e-6)
  # DLR falls back to the margin with two classes.
  np.testing.assert_allclose(o["dlr2"], o["margin2"])
  # Targets: never the true label, every other class used.
  yy = np.arange(200, dtype=np.int32) % 5
  tt = np.asarray(jax.jit(A.target_labels, static_argnums=2)(jax.random.key(3), yy, 5))
  assert np.all(tt != yy) and set(tt.tolist()) == set(range(5))


def test_perturbation_norm_and_projection():
  delta = _f32([[3.0, -4.0], [0.5, 0.0]]).reshape(2, 1, 2, 1)
  x = np.full((2, 1, 2, 1), 0.5, np.float32)
  wide = AttackConfig(norm="l2", epsilon=1.0, clip_min=-10.0, clip_max=10.0)
  box = AttackConfig(norm="linf", epsilon=1.0)

  @jax.jit
  def go(delta, x):
    return (A.perturbation_norm(delta, "linf"), A.perturbation_norm(delta, "l2"),
            A.project(x + delta, x, wide), A.project(x + delta, x, box))

  linf, l2, p_wide, p_box = go(delta, x)
  np.testing.assert_allclose(linf, [4.0, 0.5])
  np.testing.assert_allclose(l2, [5.0, 0.5])
  np.testing.assert_allclose(p_wide - x, delta * _f32([0.2, 1.0])[:, None, None, None], rtol=1e-6)
  np.testing.assert_allclose(p_box.reshape(2, 2), [[1.0, 0.0], [1.0, 0.5]])


# ----------------------------------------------------------------------------
# Closed forms on linear models.


def _binary_linear(rng, n, low=0.0, high=1.0):
  params = {"w": _f32(rng.normal(size=(D, 2))), "b": _f32(0.1 * rng.normal(size=2))}
  x = _f32(rng.uniform(low, high, (n,) + HW))
  y = rng.integers(0, 2, n).astype(np.int32)
  # v = w_y - w_j per example, so that the margin z_y - z_j is x.v + b_y - b_j.
  v = params["w"][:, 0] - params["w"][:, 1]
  v = np.where(y[:, None] == 0, v, -v).astype(np.float64)
  return params, x, y, v


def _true_margin(params, x, y):
  """z_y - z_j for the binary linear model (float64 numpy)."""
  z = _np_linear(jax.tree.map(np.float64, params), np.float64(x))
  idx = np.arange(y.shape[0])
  return z[idx, y] - z[idx, 1 - y]


def test_closed_form_worst_case_binary_linear():
  # Inputs in [0.4, 0.6] and eps = 0.05: the [0, 1] box never binds.
  params, x, y, v = _binary_linear(_rng(1), 16, 0.4, 0.6)
  eps = 0.05
  clean = _true_margin(params, x, y)
  linf_min = clean - eps * np.sum(np.abs(v), -1)
  l2_min = clean - eps * np.linalg.norm(v, axis=-1)

  linf = dict(norm="linf", epsilon=eps, loss="margin")
  l2 = dict(norm="l2", epsilon=eps, loss="margin")
  cfgs = [
      AttackConfig(name="pgd", steps=10, **linf),
      AttackConfig(name="fgsm", random_start=False, **linf),
      AttackConfig(name="apgd", steps=10, **linf),
      # A large step contracts the random start's off-gradient component fast.
      AttackConfig(name="pgd", steps=30, step_size=eps / 2, **l2),
      AttackConfig(name="fgsm", random_start=False, **l2),
      AttackConfig(name="apgd", steps=30, **l2),
      # The training-time variants: the last iterate, no bookkeeping.
      AttackConfig(name="pgd", steps=10, track_best=False, **linf),
      AttackConfig(name="fgsm", random_start=False, track_best=False, **linf),
  ]
  res, _, _ = _run_all(cfgs, linear_logits, params, x, y, jax.random.key(2))
  res, last = res[:6], res[6:]
  m = [_true_margin(params, r.x_adv, y) for r in res]
  for r in last:
    np.testing.assert_allclose(_true_margin(params, r.x_adv, y), linf_min, atol=1e-4)
  np.testing.assert_array_equal(last[1].x_adv, res[1].x_adv)
  np.testing.assert_allclose(m[0], linf_min, atol=1e-4)
  np.testing.assert_allclose(m[1], linf_min, atol=1e-5)  # FGSM is exact here
  np.testing.assert_allclose(m[2], linf_min, atol=1e-4)
  np.testing.assert_allclose(m[3], l2_min, atol=1e-4)
  np.testing.assert_allclose(m[4], l2_min, atol=1e-5)
  np.testing.assert_allclose(m[5], l2_min, atol=1e-4)
  # FGSM's point itself is the closed-form optimum x - eps * sign(w_y - w_j).
  np.testing.assert_allclose(
      res[1].x_adv.reshape(-1, D), x.reshape(-1, D) - eps * np.sign(v), atol=1e-6
  )
  for r, mm in zip(res, m):
    np.testing.assert_array_equal(r.correct, (mm > 0) & (clean > 0))


def test_robust_accuracy_monotone_in_eps_linear():
  """Binary linear model with a binding box: PGD is provably exact (each
  coordinate moves against sign(w_y - w_j) to the end of its interval in
  ball ∩ box), so worst_case(PGD, APGD) is correct iff the closed-form
  minimum margin is positive, which is monotone in eps."""
  params, x, y, v = _binary_linear(_rng(5), 64)
  epsilons = [0.0, 0.01, 0.05, 0.1, 0.3]
  cfgs = [
      [AttackConfig(name="pgd", epsilon=e, loss="margin"),
       AttackConfig(name="apgd", epsilon=e, loss="dlr")]
      for e in epsilons
  ]
  res, clean_pred, _ = _run_all(cfgs, linear_logits, params, x, y, jax.random.key(6))
  acc = [float(r.correct.mean()) for r in res]
  assert acc[0] == np.mean(clean_pred == y)  # eps = 0: robust == clean
  assert all(a >= b for a, b in zip(acc, acc[1:])), acc
  assert acc[-1] < acc[1], acc  # the sweep is not trivially flat
  clean = _true_margin(params, x, y)
  xf = np.float64(x.reshape(-1, D))
  for e, r in zip(epsilons, res):
    delta = np.clip(-e * np.sign(v), -xf, 1.0 - xf)
    min_margin = clean + np.sum(v * delta, -1)
    decided = np.abs(min_margin) > 1e-4
    np.testing.assert_array_equal(r.correct[decided], (min_margin > 0)[decided])
    assert np.all(np.asarray(A.perturbation_norm(r.x_adv - x, "linf")) <= e + 1e-6)


def test_zero_robust_accuracy_at_eps_one():
  """4 classes on 4x4x1 inputs; class c's logit is the sum of quadrant c.
  Class c's region contains the box vertex with quadrant c at 1 and the rest
  at 0 (logits 4 vs 0), so every class region meets [0, 1]^16, and an Linf
  ball of radius 1 around any input covers the whole box: every example can
  be misclassified, and a working attack must reach 0 robust accuracy."""
  quadrant = np.zeros((4, 4), np.int32)
  quadrant[:2, 2:], quadrant[2:, :2], quadrant[2:, 2:] = 1, 2, 3
  params = {"w": _f32(np.eye(4)[quadrant.reshape(-1)]), "b": _f32(np.zeros(4))}
  x = _f32(_rng(7).uniform(0.05, 0.95, (32,) + HW))
  y = np.argmax(_np_linear(params, x), -1).astype(np.int32)  # clean accuracy 1
  cfgs = [
      AttackConfig(name="pgd", epsilon=1.0, loss="ce"),
      AttackConfig(name="apgd", epsilon=1.0, loss="dlr"),
      AttackConfig(name="fgsm", epsilon=1.0, loss="margin", random_start=False),
      AttackConfig(name="pgd", epsilon=0.02, loss="ce"),
      AttackConfig(name="pgd", epsilon=1.0, loss="ce", track_best=False),
  ]
  res, _, preds = _run_all(cfgs, linear_logits, params, x, y, jax.random.key(8))
  for r, pred in zip(res[:3], preds):
    assert not np.any(r.correct)
    assert np.all(pred != y)
  assert np.all(preds[4] != y)  # the last iterate alone reaches 0% too
  assert 0.0 < res[3].correct.mean() < 1.0  # a smaller ball leaves some correct


def test_targeted_success_increases_with_steps():
  rng = _rng(9)
  params = {"w": _f32(rng.normal(size=(D, 4))), "b": _f32(np.zeros(4))}
  x = _f32(rng.uniform(0, 1, (64,) + HW))
  y = np.argmax(_np_linear(params, x), -1).astype(np.int32)  # clean accuracy 1
  key = jax.random.key(10)
  steps = [1, 3, 10, 30]
  cfgs = [
      AttackConfig(epsilon=0.3, steps=s, step_size=0.01, targeted=True, loss="ce")
      for s in steps
  ]
  res, _, preds = _run_all(cfgs, linear_logits, params, x, y, key)
  target = np.asarray(jax.jit(A.target_labels, static_argnums=2)(key, y, 4))
  success = [float(np.mean(p == target)) for p in preds]
  assert all(a <= b for a, b in zip(success, success[1:])), success
  assert success[-1] > success[0] + 0.2, success
  # "correct" still refers to the true label and can only go down.
  acc = [float(r.correct.mean()) for r in res]
  assert all(a >= b for a, b in zip(acc, acc[1:])), acc


def bowl_logits(params, x):
  """Binary "model" whose label-0 margin objective -s ||x - c||^2 peaks at
  c (per example), strictly inside the ball: fixed-size steps oscillate."""
  d = jnp.sum((x.reshape(x.shape[0], -1) - params["c"]) ** 2, -1)
  return jnp.stack([jnp.zeros_like(d), -params["s"] * d], -1)


def _apgd_reference(x, c, s, eps, n_iter):
  """Plain-loop APGD (Croce & Hein 2020, Alg. 1; Linf, no random start) on
  f(u) = -s ||u - c||^2, per example, in float32 numpy."""
  f = lambda u: -s * np.sum((u - c) ** 2, -1, dtype=np.float32)
  grad = lambda u: -2 * s * (u - c)
  proj = lambda u: np.clip(x + np.clip(u - x, -eps, eps), 0, 1).astype(np.float32)
  col = lambda v: v[:, None]
  w = A.apgd_checkpoints(n_iter)
  alpha, rho = np.float32(0.75), 0.75
  eta = np.full(x.shape[0], 2 * eps, np.float32)
  x_prev = x_cur = x_max = x
  f_cur = f_max = f(x)
  count, eta_last, f_max_last = np.zeros(x.shape[0]), eta, f_max
  for k in range(n_iter):
    z = proj(x_cur + col(eta) * np.sign(grad(x_cur)))
    x_new = z if k == 0 else proj(x_cur + alpha * (z - x_cur) + (1 - alpha) * (x_cur - x_prev))
    f_new = f(x_new)
    increased = f_new > f_cur
    better = f_new > f_max
    x_max, f_max = np.where(col(better), x_new, x_max), np.where(better, f_new, f_max)
    if k in w[1:]:
      window = k - w[w.index(k) - 1]
      reduce = (count < rho * window) | ((eta == eta_last) & (f_max == f_max_last))
      eta_last, f_max_last = eta, f_max
      eta = np.where(reduce, eta / 2, eta).astype(np.float32)
      x_new = np.where(col(reduce), x_max, x_new)
      f_new = np.where(reduce, f_max, f_new)
      count = increased.astype(float)
    else:
      count = count + increased
    x_prev, x_cur, f_cur = x_cur, x_new, f_new
  return x_max


def test_apgd_matches_reference_and_halving_converges():
  rng = _rng(16)
  eps, n = 0.1, 8
  x = np.full((n,) + HW, 0.5, np.float32)
  params = {"c": _f32(0.5 + rng.uniform(-eps / 2, eps / 2, (n, D))), "s": np.float32(3.0)}
  y = np.zeros(n, np.int32)
  cfgs = [AttackConfig(name="apgd", epsilon=eps, steps=s, loss="margin", random_start=False)
          for s in (100, 17)]
  res, _, _ = _run_all(cfgs, bowl_logits, params, x, y, jax.random.key(17))
  for c, r in zip(cfgs, res):
    ref = _apgd_reference(x.reshape(n, D), params["c"], params["s"], eps, c.steps)
    np.testing.assert_allclose(r.x_adv.reshape(n, D), ref, atol=1e-6)
  # The first step is 2 eps; only repeated halving (8 checkpoints) gets
  # every coordinate of every example this close to c.
  dist = np.abs(res[0].x_adv.reshape(n, D) - params["c"]).max(-1)
  assert np.all(dist < eps / 30), dist


def toy1d_logits(params, x):
  """3 classes on a single pixel u: z_0 = 0, class a_i gets
  a0 - s (u - c)^2 and class b_i gets b0 + k (m - u) (per example)."""
  u = x.reshape(x.shape[0])
  za = params["a0"] - params["s"] * (u - params["c"]) ** 2
  zb = params["b0"] + params["k"] * (params["m"] - u)
  return (jax.nn.one_hot(params["ia"], 3) * za[:, None]
          + jax.nn.one_hot(params["ib"], 3) * zb[:, None])


def test_correct_is_an_and_and_x_adv_prefers_misclassified():
  """PGD (no random start, step 0.04) from u = 0.50 oscillates 0.50, 0.54,
  0.50 about an objective peak at 0.53.
  Example 0 (untargeted margin, class 1 = bump of height 0.04, radius 0.02):
    correct at 0.50, wrong at 0.54, correct again at the last iterate.
  Example 1 (targeted margin towards t): z_t = -1 - 100 (u - 0.53)^2 and
    class o = 3 - t has 10 (0.52 - u): at 0.50 class o wins (wrong, lower
    objective), at 0.54 class 0 wins (correct, higher objective)."""
  key = jax.random.key(18)
  y = np.zeros(2, np.int32)
  t = int(jax.jit(A.target_labels, static_argnums=2)(key, y, 3)[1])
  params = {
      "ia": np.array([1, t], np.int32), "ib": np.array([2, 3 - t], np.int32),
      "a0": _f32([0.04, -1.0]), "s": _f32([100.0, 100.0]), "c": _f32([0.53, 0.53]),
      "b0": _f32([-10.0, 0.0]), "k": _f32([0.0, 10.0]), "m": _f32([0.52, 0.52]),
  }
  x = np.full((2, 1, 1, 1), 0.5, np.float32)
  common = dict(epsilon=0.1, step_size=0.04, steps=2, loss="margin", random_start=False)
  cfgs = [AttackConfig(**common), AttackConfig(targeted=True, **common)]
  res, clean_pred, _ = _run_all(cfgs, toy1d_logits, params, x, y, key)
  untargeted, targeted = res
  np.testing.assert_array_equal(clean_pred, [0, 3 - t])
  assert not untargeted.correct[0]  # wrong once, in the middle
  np.testing.assert_allclose(untargeted.x_adv[0].ravel(), [0.54], atol=1e-6)
  assert not targeted.correct[1]
  # The misclassified point wins over the correct one of higher objective.
  np.testing.assert_allclose(targeted.x_adv[1].ravel(), [0.50], atol=1e-6)


# ----------------------------------------------------------------------------
# Batch-coupled nonlinear model.


def test_every_attack_stays_in_ball_and_box(trained_mlp):
  params, x, y = trained_mlp
  cfgs = []
  for name in ("fgsm", "pgd", "apgd"):
    cfgs += [
        AttackConfig(name=name, norm="linf", epsilon=0.5, steps=5, loss="ce"),
        AttackConfig(name=name, norm="l2", epsilon=2.0, steps=5, loss="dlr",
                     random_start=name != "pgd"),
        AttackConfig(name=name, norm="linf", epsilon=0.05, steps=5, loss="margin",
                     targeted=True, restarts=2),
    ]
  res, _, _ = _run_all(cfgs, mlp_bn_logits, params, x, y, jax.random.key(11))
  for c, r in zip(cfgs, res):
    n = np.asarray(A.perturbation_norm(r.x_adv - x, c.norm))
    assert np.all(n <= c.epsilon + 1e-6), (c, n.max())
    assert np.mean(n > 0) > 0.5, c  # the attack moved (x_adv may be x)
    assert r.x_adv.min() >= c.clip_min and r.x_adv.max() <= c.clip_max, c
    assert r.x_adv.shape == x.shape and r.correct.shape == y.shape


def test_mlp_attack_strength_and_monotonicity(trained_mlp):
  params, x, y = trained_mlp
  key = jax.random.key(12)
  strong_pgd = AttackConfig(name="pgd", epsilon=0.3, steps=20, loss="ce")
  pgd = AttackConfig(name="pgd", epsilon=0.12, steps=20, loss="ce")
  apgd_ce = AttackConfig(name="apgd", epsilon=0.12, steps=20, loss="ce")
  apgd_dlr = AttackConfig(name="apgd", epsilon=0.12, steps=20, loss="dlr")
  fixed = dict(epsilon=0.12, step_size=0.01)
  cfgs = [
      strong_pgd, pgd, apgd_ce, apgd_dlr, [pgd, apgd_ce, apgd_dlr],
      (pgd, 0), (apgd_ce, 1), (apgd_dlr, 2),
      *[AttackConfig(steps=s, **fixed) for s in (5, 10, 20)],
      *[AttackConfig(steps=5, restarts=r, **fixed) for r in (1, 2, 4)],
  ]
  res, clean_pred, _ = _run_all(cfgs, mlp_bn_logits, params, x, y, key)
  clean_ok = clean_pred == y
  acc = [float(r.correct.mean()) for r in res]
  for r in res:
    assert np.all(r.correct <= clean_ok)
  clean = float(clean_ok.mean())
  assert acc[0] <= clean - 0.5, (clean, acc[0])  # PGD-20 at eps 0.3 breaks it
  assert acc[1] < clean  # the comparisons below are not all trivially at 0
  assert acc[2] <= acc[1] and acc[3] <= acc[1], acc  # APGD >= PGD in strength
  # worst_case ran attack i with fold_in(key, i): its correct is the AND.
  wc, keyed = res[4], res[5:8]
  np.testing.assert_array_equal(wc.correct, np.all([r.correct for r in keyed], 0))
  # Each x_adv of worst_case comes from one of the attacks, a fooling one
  # whenever the example is not robust.
  same = np.array([np.all(np.isclose(wc.x_adv, r.x_adv).reshape(len(y), -1), -1)
                   for r in keyed])
  assert np.all(same.any(0))
  fooling = np.array([~r.correct for r in keyed])
  assert np.all((same & fooling).any(0) | wc.correct)
  # Steps (prefix trajectories) and restarts (superset of starts): elementwise.
  c5, c10, c20 = (r.correct for r in res[8:11])
  r1, r2, r4 = (r.correct for r in res[11:14])
  assert np.all(c10 <= c5) and np.all(c20 <= c10), acc[8:11]
  assert np.all(r2 <= r1) and np.all(r4 <= r2), acc[11:14]
  np.testing.assert_array_equal(c5, r1)  # same config, same key


def test_vmap_over_tasks_matches_loop(trained_mlp):
  params, x, y = trained_mlp
  num_tasks, rng = 3, _rng(13)
  # Per-task "adapted" parameters and per-task batches.
  task_params = jax.tree.map(
      lambda a: _f32(a[None] + 0.05 * rng.normal(size=(num_tasks,) + a.shape)), params
  )
  perm = np.stack([rng.permutation(x.shape[0])[:24] for _ in range(num_tasks)])
  xs, ys = x[perm], y[perm]
  cfgs = [AttackConfig(name="fgsm", epsilon=0.1),
          AttackConfig(name="apgd", epsilon=0.1, steps=5, loss="dlr")]
  run = lambda p, x, y, k: A.worst_case(cfgs, mlp_bn_logits, p, x, y, k)

  @jax.jit
  def batched_and_looped(task_params, xs, ys, key):
    keys = jax.random.split(key, num_tasks)
    batched = jax.vmap(run)(task_params, xs, ys, keys)
    looped = [run(jax.tree.map(lambda a: a[t], task_params), xs[t], ys[t], keys[t])
              for t in range(num_tasks)]
    return batched, looped

  batched, looped = jax.device_get(batched_and_looped(task_params, xs, ys, jax.random.key(14)))
  assert 0 < batched.correct.mean() < 1
  for t in range(num_tasks):
    np.testing.assert_array_equal(batched.correct[t], looped[t].correct)
    np.testing.assert_allclose(batched.x_adv[t], looped[t].x_adv, atol=1e-5)


def test_jit_does_not_retrace():
  rng = _rng(15)
  params = {"w": _f32(rng.normal(size=(D, 3))), "b": _f32(np.zeros(3))}
  cfg = AttackConfig(name="pgd", epsilon=0.1, steps=3)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(params, x, y, key):
    return A.attack(cfg, linear_logits, params, x, y, key)

  for seed in range(3):
    x = _f32(rng.uniform(0, 1, (8,) + HW))
    y = rng.integers(0, 3, 8).astype(np.int32)
    jax.block_until_ready(run(params, x, y, jax.random.key(seed)))
  # The counter is live: a new shape forces a second trace.
  with pytest.raises(AssertionError):
    run(params, x[:4], y[:4], jax.random.key(0))


def test_last_iterate_is_plain_pgd_and_costs_steps_gradients(trained_mlp):
  """track_best=False against a hand-written PGD loop (same start), on the
  batch-coupled MLP, and its cost: `steps` forward+backward passes, where the
  tracked attack takes one more plus a clean forward."""
  from advmaml.bench.flops import count_flops
  params, x, y = trained_mlp
  x, y = x[:32], y[:32]
  key = jax.random.key(21)
  cfg = AttackConfig(name="pgd", epsilon=0.1, steps=7, step_size=0.025, loss="ce",
                     track_best=False)

  def reference(params, x, y, key):
    xk = A.random_start(jax.random.fold_in(jax.random.split(key)[1], 0), x, cfg)
    ce = lambda xb: -jnp.sum(jax.nn.log_softmax(mlp_bn_logits(params, xb))[jnp.arange(32), y])
    for _ in range(7):
      xk = jnp.clip(jnp.clip(xk + 0.025 * jnp.sign(jax.grad(ce)(xk)) - x, -0.1, 0.1) + x, 0, 1)
    return xk

  ours = jax.jit(lambda *a: A.attack(cfg, mlp_bn_logits, *a))(params, x, y, key)
  np.testing.assert_allclose(ours.x_adv, jax.jit(reference)(params, x, y, key), atol=1e-6)
  clean = np.argmax(mlp_bn_logits(params, x), -1) == y
  assert np.mean(np.argmax(mlp_bn_logits(params, ours.x_adv), -1) == y) < np.mean(clean)

  flops = lambda c: count_flops(lambda *a: A.attack(c, mlp_bn_logits, *a).x_adv,
                                params, x, y, key)
  one_step = flops(dataclasses.replace(cfg, steps=1))
  forward = count_flops(mlp_bn_logits, params, x)
  assert flops(cfg) == 7 * one_step
  assert flops(dataclasses.replace(cfg, track_best=True)) == 8 * one_step + forward


def test_last_iterate_refuses_what_needs_a_choice_of_points():
  with pytest.raises(ValueError, match="track_best"):
    AttackConfig(name="apgd", track_best=False)
  with pytest.raises(ValueError, match="track_best"):
    AttackConfig(name="pgd", restarts=2, track_best=False)
  x, y = np.zeros((2,) + HW, np.float32), np.zeros(2, np.int32)
  params = {"w": np.zeros((D, 2), np.float32), "b": np.zeros(2, np.float32)}
  with pytest.raises(ValueError, match="track_best=True"):
    A.worst_case([AttackConfig(track_best=False)], linear_logits, params, x, y,
                 jax.random.key(0))


# ----------------------------------------------------------------------------
# Attacks aimed at one example of a batch-coupled batch.


def centred_logits(params, x):
  """Binary model on one pixel u, centred over the batch: z = (0, u - mean(u) - t).
  Example j is wrong iff u_j - mean(u) > t; the summed margin sum_j (u_j -
  mean(u) - t) does not depend on u at all (its gradient is exactly 0 with 4
  examples), while example i's alone rises with u_i and falls with the others."""
  u = x.reshape(x.shape[0], -1)[:, 0]
  h = u - jnp.mean(u)
  return jnp.stack([jnp.zeros_like(h), h - params["t"]], -1)


def test_per_example_breaks_what_the_summed_loss_cannot():
  """Closed form: the batch strongest against example i puts u_i at 0.5 + eps
  and the others at 0.5 - eps, so u_i - mean(u) = 1.5 eps > t = eps; the
  summed-loss attacks (no random start, zero gradient) never move."""
  n, eps = 4, 0.1
  x, y = np.full((n, 1, 1, 1), 0.5, np.float32), np.zeros(n, np.int32)
  params = {"t": np.float32(eps)}
  common = dict(epsilon=eps, steps=10, random_start=False)
  cfgs = [AttackConfig("pgd", loss="margin", **common), AttackConfig("apgd", loss="dlr", **common)]

  @jax.jit
  def go(params, x, y, key):
    return (A.worst_case(cfgs, centred_logits, params, x, y, key),
            A.per_example(cfgs, centred_logits, params, x, y, key),
            A.per_example(cfgs, centred_logits, params, x, y, key, chunk=3),
            [A.per_example([c], centred_logits, params, x, y, key) for c in cfgs])

  summed, aimed, chunked, singles = jax.device_get(go(params, x, y, jax.random.key(30)))
  assert np.all(summed.correct)  # the clean batch is right and never moves
  np.testing.assert_array_equal(summed.x_adv, x)
  optimum = np.where(np.eye(n, dtype=bool), 0.5 + eps, 0.5 - eps)
  for r in [aimed, *singles]:
    assert not np.any(r.correct)
    assert r.x_adv.shape == (n,) + x.shape
    np.testing.assert_allclose(r.x_adv.reshape(n, n), optimum, atol=1e-6)
  # Chunks of 3 over 4 aims (a remainder) give the same attacks.
  np.testing.assert_array_equal(chunked.correct, aimed.correct)
  np.testing.assert_array_equal(chunked.x_adv, aimed.x_adv)


def test_alone_attacks_one_query_with_the_others_clean():
  """Closed form on the centred model: alone, row i reaches u_i = 0.5 + eps with the
  others at 0.5, so u_i - mean(u) = (1 - 1/n) eps < t = eps and nothing breaks, where the
  joint adversary (per_example) breaks every row; large enough eps breaks each alone."""
  n, eps = 4, 0.1
  x, y = np.full((n, 1, 1, 1), 0.5, np.float32), np.zeros(n, np.int32)
  params = {"t": np.float32(eps)}
  cfgs = lambda e: [AttackConfig("pgd", loss="margin", epsilon=e, steps=10, random_start=False),
                    AttackConfig("apgd", loss="dlr", epsilon=e, steps=10, random_start=False)]

  @jax.jit
  def go(params, x, y, key):
    return (A.alone(cfgs(eps), centred_logits, params, x, y, key),
            A.alone(cfgs(eps), centred_logits, params, x, y, key, chunk=3),
            A.per_example(cfgs(eps), centred_logits, params, x, y, key),
            A.alone(cfgs(0.3), centred_logits, params, x, y, key))

  alone, chunked, joint, large = jax.device_get(go(params, x, y, jax.random.key(33)))
  assert np.all(alone.correct) and not np.any(joint.correct)
  np.testing.assert_allclose(alone.x_adv.reshape(n), 0.5 + eps, atol=1e-6)
  np.testing.assert_array_equal(chunked.x_adv, alone.x_adv)
  assert not np.any(large.correct)       # (1 - 1/4) * 0.3 > 0.1: each row breaks alone


def test_alone_equals_the_summed_attack_without_coupling():
  """On a linear model (rows independent) each row alone moves as in the summed attack."""
  rng = _rng(34)
  n = 10
  params = {"w": _f32(rng.normal(size=(D, 3))), "b": _f32(0.1 * rng.normal(size=3))}
  x = _f32(rng.uniform(0.2, 0.8, (n,) + HW))
  y = np.argmax(_np_linear(params, x), -1).astype(np.int32)
  cfg = AttackConfig("pgd", loss="margin", epsilon=0.15, steps=10, random_start=False)
  summed = jax.device_get(jax.jit(lambda p, x, y: A.worst_case([cfg], linear_logits, p, x, y,
                                                               jax.random.key(0)))(params, x, y))
  alone = jax.device_get(jax.jit(lambda p, x, y: A.alone([cfg], linear_logits, p, x, y,
                                                         jax.random.key(0)))(params, x, y))
  assert 0 < summed.correct.sum() < n                  # some rows break, some do not
  np.testing.assert_array_equal(alone.correct, summed.correct)
  np.testing.assert_allclose(alone.x_adv, summed.x_adv, atol=1e-6)


def test_per_example_equals_summed_without_coupling(x64):
  """A linear model does not couple its rows: the attack aimed at example i
  moves row i exactly as the summed-loss attack does (same start, same
  per-row step-size control) and leaves the other rows where they started.

  In float64: the two paths reduce in different orders (a batch of n against
  n batches of n), and in float32 12 APGD steps (DLR divides by a logit gap)
  grew that rounding to 7e-5 on one CI machine (2e-4 relative); a row attacked
  through another example's loss moves the other way, of order epsilon (3e-2)."""
  rng = _rng(31)
  n = 12
  f64 = lambda a: np.asarray(a, np.float64)
  params = {"w": f64(rng.normal(size=(D, 3))), "b": f64(0.1 * rng.normal(size=3))}
  x = f64(rng.uniform(0.2, 0.8, (n,) + HW))
  y = np.argmax(_np_linear(params, x), -1).astype(np.int32)  # clean accuracy 1
  common = dict(epsilon=0.03, steps=12, random_start=False)
  cfgs = [AttackConfig("pgd", loss="margin", **common), AttackConfig("apgd", loss="dlr", **common),
          AttackConfig("apgd", loss="ce", norm="l2", epsilon=0.1, steps=12, random_start=False)]
  binary, xb, yb, v = _binary_linear(_rng(32), n, 0.4, 0.6)
  binary, xb = jax.tree.map(f64, binary), f64(xb)
  rand = AttackConfig("pgd", loss="margin", epsilon=0.05, steps=10)

  @jax.jit
  def go(params, x, y, binary, xb, yb, key):
    return ([A.worst_case([c], linear_logits, params, x, y, key) for c in cfgs],
            [A.per_example([c], linear_logits, params, x, y, key) for c in cfgs],
            A.worst_case(cfgs, linear_logits, params, x, y, key),
            A.per_example(cfgs, linear_logits, params, x, y, key),
            A.per_example([rand], linear_logits, binary, xb, yb, key))

  summed, aimed, summed_all, aimed_all, rand_aimed = jax.device_get(
      go(params, x, y, binary, xb, yb, jax.random.key(33)))
  idx = np.arange(n)
  for s, a in [*zip(summed, aimed), (summed_all, aimed_all)]:
    np.testing.assert_array_equal(a.correct, s.correct)
    np.testing.assert_allclose(a.x_adv[idx, idx], s.x_adv, atol=1e-6)
    off_diagonal = ~np.eye(n, dtype=bool)
    np.testing.assert_array_equal(a.x_adv[off_diagonal], np.broadcast_to(x, (n,) + x.shape)[off_diagonal])
  assert 0 < summed_all.correct.mean() < 1, summed_all.correct
  # With random starts: row i of the batch aimed at i reaches the closed-form
  # minimum margin of the binary linear model, x - eps * sign(w_y - w_j).
  m = np.array([_true_margin(binary, rand_aimed.x_adv[i], yb)[i] for i in range(n)])
  np.testing.assert_allclose(m, _true_margin(binary, xb, yb) - 0.05 * np.abs(v).sum(-1), atol=1e-4)


def test_per_example_on_batch_coupled_mlp(trained_mlp):
  """On the batch-norm MLP the aimed attacks stay in the ball and the box
  (every row of every batch), never exceed clean accuracy, find at least as
  many errors as the summed-loss attacks of the same budget, and count every
  example their batch strongest against it misclassifies."""
  params, x, y = trained_mlp
  x, y = x[:24], y[:24]
  eps = 0.03
  cfgs = [AttackConfig("pgd", loss="margin", epsilon=eps, steps=8),
          AttackConfig("apgd", loss="dlr", epsilon=eps, steps=8)]

  @jax.jit
  def go(params, x, y, key):
    summed = A.worst_case(cfgs, mlp_bn_logits, params, x, y, key)
    aimed = A.per_example(cfgs, mlp_bn_logits, params, x, y, key, chunk=8)
    own = jax.vmap(lambda xb, i: jnp.argmax(mlp_bn_logits(params, xb)[i]))(aimed.x_adv,
                                                                          jnp.arange(24))
    return summed, aimed, own, jnp.argmax(mlp_bn_logits(params, x), -1)

  summed, aimed, own_pred, clean_pred = jax.device_get(go(params, x, y, jax.random.key(34)))
  flat = aimed.x_adv.reshape(-1, *x.shape[1:])
  n = np.asarray(A.perturbation_norm(flat - np.tile(x, (24, 1, 1, 1)), "linf"))
  assert np.all(n <= eps + 1e-6) and flat.min() >= 0.0 and flat.max() <= 1.0
  clean_ok = clean_pred == y
  assert np.all(aimed.correct <= clean_ok) and np.all(summed.correct <= clean_ok)
  assert 0 < summed.correct.mean() < clean_ok.mean()  # eps leaves something to find
  assert aimed.correct.mean() <= summed.correct.mean(), (aimed.correct.mean(), summed.correct.mean())
  assert np.all(aimed.correct <= (own_pred == y))
