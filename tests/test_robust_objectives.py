"""Robust objectives: meta-gradients with the perturbation held fixed, reductions
to natural MAML, ADML's two halves, the KL attack, a jitted training step, config."""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import sys

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from advmaml import config
from advmaml.adversary import attacks
from advmaml.objectives import robust as ro
from advmaml.data.episodes import Episode
from advmaml.learners import MAML as Learner, query_loss
from advmaml.train.meta_step import init_train_state, make_train_step
from advmaml.models import make_model
from advmaml.objectives import get_objective, natural

N_WAY, K, Q, SIZE = 3, 2, 2, 8
PGD = attacks.AttackConfig("pgd", "linf", epsilon=0.1, steps=3)
# L2 steps g/||g|| depend smoothly on the params (Linf's sign steps have zero
# derivative), so a perturbation that is not held constant changes the gradient.
PGD_L2 = attacks.AttackConfig("pgd", "l2", epsilon=1.0, steps=3)


def tiny_task(key, dtype=jnp.float32) -> Episode:
  """A random 3-way task of 8x8 images, K=2 support and Q=2 query per class."""
  k1, k2 = jax.random.split(key)
  return Episode(jax.random.uniform(k1, (N_WAY * K, SIZE, SIZE, 1), dtype),
                 jnp.repeat(jnp.arange(N_WAY), K),
                 jax.random.uniform(k2, (N_WAY * Q, SIZE, SIZE, 1), dtype),
                 jnp.repeat(jnp.arange(N_WAY), Q))


def mlp_apply(params, x):
  """A 64-8-3 tanh network on (B, 8, 8, 1) images -> (B, 3) logits.

  Smooth (no ReLU kinks for finite differences) and about 7x cheaper to compile
  than Conv4: the objectives only see ``apply_fn``, so the maths tests use it
  and the training-step test also runs the real Conv4.
  """
  h = jnp.tanh(x.reshape(x.shape[0], -1) @ params["body"]["w"] + params["body"]["b"])
  return h @ params["head"]["w"] + params["head"]["b"]


def mlp_init(key):
  k1, k2 = jax.random.split(key)
  return {"body": {"w": 0.3 * jax.random.normal(k1, (SIZE * SIZE, 8)), "b": jnp.zeros(8)},
          "head": {"w": 0.5 * jax.random.normal(k2, (8, N_WAY)), "b": jnp.zeros(N_WAY)}}


def tiny_setup(dtype=jnp.float32):
  learner = Learner(mlp_apply, inner_steps=1, inner_lr=0.3)
  meta = learner.init_meta_params(mlp_init(jax.random.key(0)))
  meta = jax.tree.map(lambda x: jnp.asarray(x, dtype), meta)
  return learner, meta, tiny_task(jax.random.key(1), dtype)


def max_abs_diff(a, b) -> float:
  return float(jax.tree.reduce(max, jax.tree.map(lambda u, v: jnp.abs(u - v).max(), a, b)))


# ----------------------------------------------------------------------------
# Meta-gradients with the perturbation held fixed.

OBJECTIVES = {
    "aq": functools.partial(ro.adversarial_querying, trades_beta=0.5),  # CE + TRADES term
    "adml": ro.adml,
    "rmaml": functools.partial(ro.rmaml, beta=2.0),
    "adv_support": ro.adversarial_support,
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_meta_gradient_matches_finite_differences_with_fixed_perturbation(x64, name):
  """jax.grad of the objective == jax.grad with its own x_adv fed back as a
  constant == central finite differences of that fixed-x_adv loss."""
  learner, meta, task = tiny_setup(jnp.float64)
  obj = functools.partial(OBJECTIVES[name], learner, attack_cfg=PGD_L2)
  key = jax.random.key(7)
  flat, unravel = jax.flatten_util.ravel_pytree(meta)

  def fixed_loss(v, adv):
    return obj(unravel(v), task, key, adv=adv)[0]

  @jax.jit
  def grads(v):
    _, _, adv = obj(unravel(v), task, key, with_inputs=True)
    g_own = jax.grad(lambda w: obj(unravel(w), task, key)[0])(v)
    return adv, g_own, jax.grad(fixed_loss)(v, adv)

  adv, g_own, g_fixed = grads(flat)
  for k, x_adv in adv.items():  # a real, in-ball perturbation
    norms = attacks.perturbation_norm(x_adv - getattr(task, k), "l2")
    assert 0.1 < float(norms.min()) and float(norms.max()) <= PGD_L2.epsilon + 1e-9, k

  num, eps = 16, 1e-6
  idx = np.random.default_rng(0).choice(flat.size, num, replace=False)
  steps = jnp.zeros((num, flat.size)).at[jnp.arange(num), idx].set(eps)
  f_batch = jax.jit(jax.vmap(lambda e, adv: fixed_loss(flat + e, adv), (0, None)))
  values = f_batch(jnp.concatenate([steps, -steps]), adv)
  fd = (values[:num] - values[num:]) / (2 * eps)
  np.testing.assert_allclose(np.asarray(g_fixed)[idx], fd, rtol=1e-5, atol=1e-8)
  assert np.abs(fd).max() > 1e-3
  np.testing.assert_allclose(g_own, g_fixed, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------
# Reductions to natural MAML, and what the attack does to the loss.


def _loss_and_grad(objective, learner, meta, task, key):
  return jax.jit(jax.value_and_grad(lambda m: objective(learner, m, task, key)[0]))(meta)


def test_aq_with_zero_epsilon_is_natural_maml():
  learner, meta, task = tiny_setup()
  key = jax.random.key(3)
  aq = functools.partial(ro.adversarial_querying, trades_beta=1.0,
                         attack_cfg=dataclasses.replace(PGD, epsilon=0.0))
  loss, grad = _loss_and_grad(aq, learner, meta, task, key)
  nat_loss, nat_grad = _loss_and_grad(natural, learner, meta, task, key)
  np.testing.assert_allclose(loss, nat_loss, rtol=1e-6)
  assert max_abs_diff(grad, nat_grad) < 1e-6


def test_aq_attack_raises_the_query_loss_of_conv4():
  """On the real Conv4 (batch norm couples the attacked query batch)."""
  model = make_model(N_WAY, (SIZE, SIZE, 1), filters=3, conv_impl="xla")  # compiles faster
  learner = Learner(model.apply, inner_steps=1, inner_lr=0.3)
  meta = learner.init_meta_params(model.init(jax.random.key(0)))
  task = tiny_task(jax.random.key(1))
  key = jax.random.key(3)

  @jax.jit
  def run(m):
    return natural(learner, m, task, key), ro.adversarial_querying(learner, m, task, key,
                                                                   attack_cfg=PGD)

  (nat_loss, nat_metrics), (loss, metrics) = run(meta)
  assert loss > nat_loss + 0.05
  np.testing.assert_allclose(metrics["accuracy"], nat_metrics["accuracy"])
  assert metrics["adv_accuracy"] <= metrics["accuracy"]


def test_rmaml_with_zero_beta_is_natural_maml():
  learner, meta, task = tiny_setup()
  key = jax.random.key(4)
  rm = functools.partial(ro.rmaml, beta=0.0, attack_cfg=PGD)
  loss, grad = _loss_and_grad(rm, learner, meta, task, key)
  nat_loss, nat_grad = _loss_and_grad(natural, learner, meta, task, key)
  np.testing.assert_allclose(loss, nat_loss, rtol=1e-6)
  assert max_abs_diff(grad, nat_grad) < 1e-6


def test_rmaml_kl_term_is_zero_without_and_positive_with_perturbation():
  learner, meta, task = tiny_setup()
  key = jax.random.key(5)

  @functools.partial(jax.jit, static_argnums=0)
  def run(cfg):
    loss, metrics, adv = ro.rmaml(learner, meta, task, key, attack_cfg=cfg, beta=2.0,
                                  with_inputs=True)
    fast = learner.adapt(meta, task.support_x, task.support_y)
    probs = [jax.nn.softmax(learner.apply_fn(fast, xq)) for xq in (task.query_x, adv["query_x"])]
    return loss, metrics, natural(learner, meta, task, key)[0], probs

  _, m0, _, _ = run(dataclasses.replace(PGD, epsilon=0.0))
  loss, m, nat_loss, (p, q) = run(PGD)
  assert abs(float(m0["kl"])) < 1e-6
  assert m["kl"] > 1e-3
  np.testing.assert_allclose(loss, nat_loss + 2.0 * m["kl"], rtol=1e-5)
  # KL(p_clean || p_adv), not the reverse: by hand in float64.
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  np.testing.assert_allclose(m["kl"], np.mean(np.sum(p * np.log(p / q), -1)), rtol=1e-4)
  assert abs(np.mean(np.sum(q * np.log(q / p), -1)) - m["kl"]) > 1e-3 * m["kl"]


@pytest.mark.parametrize("cfg, factor", [
    (dataclasses.replace(PGD, steps=5), 6.0),
    (dataclasses.replace(PGD, norm="l2", epsilon=1.0, steps=5), 6.0),
    (dataclasses.replace(PGD, name="fgsm", random_start=False), 1.0),  # TRADES' start
], ids=["pgd_linf", "pgd_l2", "fgsm_no_random_start"])
def test_kl_attack_stays_in_ball_and_beats_random_boundary_points(cfg, factor):
  """KL at the attack's output vs the best of 16 random points on the ball's
  boundary (Linf vertices, L2 sphere). PGD reaches 10-15x the random best; a
  PGD that descends the KL still raises it (KL is ~quadratic around x, so its
  overshooting steps land far out) but stays under 5x."""
  learner, meta, task = tiny_setup()
  params, x = meta["model"], task.query_x
  kl_at = lambda xa: ro.mean_kl(learner.apply_fn(params, x), learner.apply_fn(params, xa))

  @jax.jit
  def run(key):
    x_adv = ro.kl_attack(cfg, learner.apply_fn, params, x, key)
    d = jax.random.normal(jax.random.fold_in(key, 1), (16,) + x.shape, x.dtype)
    if cfg.norm == "linf":
      noise = cfg.epsilon * jnp.sign(d)
    else:
      noise = cfg.epsilon * d / jnp.sqrt(jnp.sum(d * d, axis=(2, 3, 4), keepdims=True))
    random_kl = jax.vmap(lambda n: kl_at(attacks.project(x + n, x, cfg)))(noise)
    return x_adv, kl_at(x_adv), random_kl.max()

  x_adv, kl_adv, kl_random = run(jax.random.key(6))
  norms = attacks.perturbation_norm(x_adv - x, cfg.norm)
  assert float(norms.max()) <= cfg.epsilon + 1e-5
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  assert kl_adv > factor * kl_random > 0


# ----------------------------------------------------------------------------
# ADML and adversarial support against independent computations.


def test_adml_is_the_mean_of_its_two_halves_aq_and_adversarial_support():
  learner, meta, task = tiny_setup()
  key = jax.random.key(8)
  k_support, k_query = jax.random.split(key)

  @jax.jit  # one compile instead of op-by-op dispatch
  def run(meta):
    # Half 1: clean support -> query attacked against the adapted params.
    fast = learner.adapt(meta, task.support_x, task.support_y)
    query_adv = attacks.attack(PGD, learner.apply_fn, fast, task.query_x, task.query_y,
                               k_query).x_adv
    half1 = query_loss(learner, fast, query_adv, task.query_y)[0]
    # Half 2: support attacked against the meta-params -> clean query.
    support_adv = attacks.attack(PGD, learner.apply_fn, meta["model"], task.support_x,
                                 task.support_y, k_support).x_adv
    fast_adv = learner.adapt(meta, support_adv, task.support_y)
    half2 = query_loss(learner, fast_adv, task.query_x, task.query_y)[0]

    # TRADES term of AQ: KL(p_clean || p_adv) on the query set, written out.
    log_p = jax.nn.log_softmax(learner.apply_fn(fast, task.query_x))
    log_q = jax.nn.log_softmax(learner.apply_fn(fast, query_adv))
    kl = jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1))

    loss = ro.adml(learner, meta, task, key, attack_cfg=PGD)[0]
    # Half 1 is AQ's loss, half 2 adversarial support training's.
    aq_loss = ro.adversarial_querying(learner, meta, task, key, attack_cfg=PGD,
                                      trades_beta=0.5)[0]
    adv_support_loss = ro.adversarial_support(learner, meta, task, key, attack_cfg=PGD)[0]
    return half1, half2, kl, loss, aq_loss, adv_support_loss

  half1, half2, kl, loss, aq_loss, adv_support_loss = run(meta)
  np.testing.assert_allclose(loss, 0.5 * (half1 + half2), rtol=1e-5)
  assert abs(float(half1 - half2)) > 1e-3  # the two halves really differ
  np.testing.assert_allclose(aq_loss, half1 + 0.5 * kl, rtol=1e-5)
  assert kl > 1e-3
  np.testing.assert_allclose(adv_support_loss, half2, rtol=1e-5)


# ----------------------------------------------------------------------------
# The jitted meta-train step.


@pytest.mark.parametrize("name", ["aq", "adml", "rmaml", "adv_support"])
def test_train_step_with_registered_objective_compiles_once_and_stays_finite(name):
  cfg = config.preset("tiny", objective=name, filters=3, image_size=SIZE, trades_beta=0.5,
                      train_attack_steps=2)
  config.validate(cfg)
  objective = get_objective(cfg)
  traces = []

  def counted(*args):
    traces.append(1)  # runs once per trace of the enclosing jitted step
    return objective(*args)

  learner = Learner(mlp_apply, cfg.inner_steps, cfg.inner_lr)
  meta = {"model": mlp_init(jax.random.key(0))}
  before = jax.tree.map(np.asarray, meta)  # the step donates its state
  optimizer = optax.adam(1e-2)
  step = make_train_step(learner, counted, optimizer, meta_batch_size=cfg.meta_batch_size,
                         n_way=cfg.n_way, k_shot=cfg.k_shot, q_query=cfg.q_query)
  state = init_train_state(meta, optimizer)
  pool = jax.random.randint(jax.random.key(1), (8, 20, SIZE, SIZE), 0, 256).astype(jnp.uint8)
  for _ in range(3):
    state, metrics = step(state, pool, jax.random.key(2))
  assert len(traces) == 1
  assert int(state.step) == 3
  for k, v in metrics.items():
    assert np.isfinite(float(v)), k
  assert {"loss", "accuracy"} <= set(metrics)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.meta_params))
  assert max_abs_diff(state.meta_params, before) > 0


def test_objectives_module_registers_robust_objectives_on_import():
  """--objective=aq works with only advmaml.objectives imported (fresh interpreter)."""
  code = ("from advmaml import config, objectives\n"
          "for name in ('aq', 'adml', 'rmaml', 'adv_support'):\n"
          "  cfg = config.Config(objective=name)\n"
          "  config.validate(cfg)\n"
          "  objectives.get_objective(cfg)\n")
  subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


# ----------------------------------------------------------------------------
# Config.


def test_train_attack_config_maps_the_flags():
  cfg = config.Config(train_attack="fgsm", train_norm="l2", train_epsilon=0.3,
                      train_attack_steps=3, train_step_size=0.2, train_random_start=False)
  assert config.train_attack_config(cfg) == attacks.AttackConfig(
      "fgsm", "l2", epsilon=0.3, step_size=0.2, steps=3, restarts=1, random_start=False,
      track_best=False)
  default = config.train_attack_config(config.Config())
  assert default.resolved_step_size() == pytest.approx(2.5 * 0.1 / 7)
  # Training takes PGD's last iterate unless asked; APGD always keeps its best point.
  assert not default.track_best
  assert config.train_attack_config(config.Config(train_attack_best=True)).track_best
  assert config.train_attack_config(config.Config(train_attack="apgd")).track_best


def test_runs_saved_before_train_attack_best_resume_as_they_ran(tmp_path):
  from advmaml.train.training import check_saved_config
  old = json.loads(config.Config(objective="aq").to_json())
  del old["train_attack_best"]  # what a config.json from before the field holds
  (tmp_path / "config.json").write_text(json.dumps(old))
  assert config.Config.from_dict(old).train_attack_best
  with pytest.raises(config.ConfigError, match="--train_attack_best: saved True vs now False"):
    check_saved_config(tmp_path, config.Config(objective="aq"))
  check_saved_config(tmp_path, config.Config(objective="aq", train_attack_best=True))


@pytest.mark.parametrize("changes, flag", [
    (dict(train_attack="cw"), "--train_attack="),
    (dict(train_norm="l1"), "--train_norm="),
    (dict(train_epsilon=-1.0), "--train_epsilon=-1.0 must be >= 0"),
    (dict(train_epsilon=float("nan")), "--train_epsilon=nan"),
    (dict(train_attack_steps=0), "--train_attack_steps=0 must be >= 1"),
    (dict(train_step_size=0.0), "--train_step_size=0.0 must be positive"),
    (dict(trades_beta=-0.5), "--trades_beta=-0.5 must be >= 0"),
    (dict(rmaml_beta=-1.0), "--rmaml_beta=-1.0 must be >= 0"),
    (dict(objective="rmaml", train_attack="apgd"), "--train_attack='apgd'"),
])
def test_validate_rejects_bad_training_attack_flags(changes, flag):
  with pytest.raises(config.ConfigError) as e:
    config.validate(config.Config(**changes))
  assert flag in str(e.value)


def test_validate_accepts_defaults_and_robust_objectives():
  for name in ("natural", "aq", "adml", "rmaml", "adv_support"):
    config.validate(config.Config(objective=name))
  config.validate(config.Config(objective="aq", train_attack="apgd", train_epsilon=0.0,
                                train_step_size=0.05))
