"""The learner protocol: a learner written here, outside the library, runs through the real
train step, training loop, evaluation and robust evaluation; MAML's optax inner loop and the
outer optimizer chosen by the config."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from advmaml import learners
from advmaml.eval import robust_eval
from advmaml.config import ConfigError, preset, validate
from advmaml.eval.evaluation import evaluate_episodes
from advmaml.learners import MAML, FewShotLearner, query_loss
from advmaml.train.meta_step import init_train_state, make_train_step
from advmaml.models import ModelSpec, make_model
from advmaml.objectives import get_objective, natural
from advmaml.eval.trained_runs import evaluate_trained, load_trained
from advmaml.train.training import build_experiment, train


# -- a new learner, against the protocol only (no library change) ------------------------
@dataclasses.dataclass(frozen=True)
class NearestCentroid:
  """Nearest class mean of the Conv4 features; logits = -squared distance / temperature."""
  model: ModelSpec
  n_way: int
  temperature: float = 8.0

  def init(self, key):
    return self.model.init(key)

  def adapt(self, meta_params, support_x, support_y, key):
    del key
    onehot = jax.nn.one_hot(support_y, self.n_way)                        # (S, N)
    feats = self.model.features(meta_params, support_x)                   # (S, D)
    centroids = onehot.T @ feats / onehot.sum(0)[:, None]                 # (N, D)
    return {"params": meta_params, "centroids": centroids}

  def logits(self, task_state, x):
    feats = self.model.features(task_state["params"], x)                  # (B, D)
    d2 = jnp.sum((feats[:, None, :] - task_state["centroids"][None]) ** 2, -1)
    return -d2 / self.temperature


def centroid_factory(cfg, model, *, phase):
  del phase
  return NearestCentroid(model, cfg.n_way)


def toy_pool(classes=12, per_class=8, size=16, seed=0):
  """(classes, per_class, size, size) uint8: noisy copies of one random pattern per class."""
  rng = np.random.default_rng(seed)
  patterns = rng.integers(0, 256, (classes, 1, size, size))
  return np.clip(patterns + rng.integers(-30, 30, (classes, per_class, size, size)),
                 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def centroid():
  model = make_model(3, (16, 16, 1), filters=8, model="conv4", kernels="reference")
  return NearestCentroid(model, 3)


def test_a_new_learner_trains_evaluates_and_is_attacked(centroid):
  assert isinstance(centroid, FewShotLearner)
  pool = toy_pool()
  opt = optax.adam(3e-3)
  state = init_train_state(centroid.init(jax.random.key(0)), opt)
  before = jax.tree.map(np.asarray, state.meta_params)
  step = make_train_step(centroid, natural, opt, meta_batch_size=2, n_way=3, k_shot=1, q_query=2)
  losses = []
  for _ in range(12):
    state, metrics = step(state, pool, jax.random.key(1))
    losses.append(float(metrics["outer_loss"]))
  assert np.isfinite(losses).all() and np.mean(losses[-4:]) < np.mean(losses[:4])
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.meta_params, before)
  assert max(jax.tree.leaves(moved["conv0"])) > 0                       # the features were meta-trained

  clean = evaluate_episodes(centroid, state.meta_params, pool, jax.random.key(2), num_episodes=8,
                            n_way=3, k_shot=1, q_query=2, batch_tasks=4)
  assert clean["accuracy"]["mean"] > 1 / 3                   # better than chance on seen classes
  metric = robust_eval.make_metric_fn(["pgd", "margin"], [0.02, 1.0], n_way=3, steps=5,
                                      per_example=("margin",))
  robust = evaluate_episodes(centroid, state.meta_params, pool, jax.random.key(2), num_episodes=8,
                             n_way=3, k_shot=1, q_query=2, batch_tasks=4, metric_fn=metric)
  assert robust["clean_accuracy"]["mean"] == clean["accuracy"]["mean"]
  key = robust_eval.metric_key
  assert robust[key(0.02)]["mean"] <= robust[key(0.02, "summed_robust_accuracy")]["mean"]
  assert robust[key(0.02, "summed_robust_accuracy")]["mean"] <= robust["clean_accuracy"]["mean"]
  assert robust[key(1.0)]["mean"] == 0.0                     # the whole box: nothing survives


def test_a_registered_learner_runs_through_train_and_evaluate(tiny_data, tmp_path):
  learners.register("centroid_test", centroid_factory)
  try:
    cfg = tiny_data.replace(learner="centroid_test", num_steps=4)
    validate(cfg)                                            # the registry's name is a choice
    train(cfg, tmp_path)
    run, splits = load_trained(tmp_path)
    assert isinstance(run.exp.learner, NearestCentroid)
    record = evaluate_trained(run, splits, num_episodes=4)
    assert 0.0 <= record["metrics"]["accuracy"]["mean"] <= 1.0 and record["step"] == 4
  finally:
    del learners.LEARNERS["centroid_test"]
  with pytest.raises(ConfigError, match="--learner='centroid_test'"):
    validate(cfg)


@pytest.fixture
def tiny_data(fake_omniglot_dir, isolated_cache):
  return preset("tiny", data_dir=str(fake_omniglot_dir))


# -- MAML's inner loop is an optax transform ---------------------------------------------
def _linear_task(seed=0, n=6, d=5, k=3):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, 1, 1, d)), jnp.float32)
  y = jnp.asarray(rng.integers(0, k, n))
  w = {"head": {"w": jnp.asarray(rng.normal(size=(d, k)), jnp.float32), "b": jnp.zeros(k)}}
  apply = lambda p, x: x.reshape(x.shape[0], -1) @ p["head"]["w"] + p["head"]["b"]
  return apply, {"model": w}, x, y


def test_default_inner_loop_is_plain_sgd_written_by_hand():
  apply, meta, x, y = _linear_task()
  learner = MAML(apply, inner_steps=3, inner_lr=0.3)
  p = meta["model"]
  for _ in range(3):
    g = jax.grad(lambda q: query_loss(learner, q, x, y)[0])(p)
    p = jax.tree.map(lambda a, b: a - 0.3 * b, p, g)
  chex.assert_trees_all_close(learner.adapt(meta, x, y, None), p, rtol=1e-6, atol=1e-6)


def test_closed_form_sgd_and_meta_sgd_equal_their_optax_transforms():
  """The default inner step p - lr * g (and Meta-SGD's p - rates * g) is optax.sgd's
  (learned_rates') update, which MAML applies in closed form for speed."""
  apply, meta, x, y = _linear_task(3)
  closed = MAML(apply, inner_steps=3, inner_lr=0.3).adapt(meta, x, y, None)
  via_optax = MAML(apply, inner_steps=3, inner_lr=0.3, inner_optimizer=optax.sgd(0.3))
  chex.assert_trees_all_close(via_optax.adapt(meta, x, y, None), closed, rtol=1e-6, atol=1e-7)
  rates = jax.tree.map(lambda p: jnp.full_like(p, 0.3), meta["model"])
  via_rates = MAML(apply, inner_steps=3, inner_optimizer=learners.maml.learned_rates(rates))
  chex.assert_trees_all_close(via_rates.adapt(meta, x, y, None), closed, rtol=1e-6, atol=1e-7)
  meta_sgd = MAML(apply, inner_steps=3, inner_lr=0.3, meta_sgd=True)
  chex.assert_trees_all_close(meta_sgd.adapt(meta_sgd.init_meta_params(meta["model"]), x, y, None),
                              closed, rtol=1e-6, atol=1e-7)


def test_inner_optimizer_by_name_and_as_a_transform_agree_with_heavy_ball_by_hand():
  apply, meta, x, y = _linear_task(1)
  by_name = MAML(apply, inner_steps=3, inner_lr=0.2, inner_optimizer="momentum")
  as_tx = MAML(apply, inner_steps=3, inner_lr=0.2, inner_optimizer=optax.sgd(0.2, momentum=0.9))
  p, v = meta["model"], jax.tree.map(jnp.zeros_like, meta["model"])
  for _ in range(3):                     # optax's trace: v <- g + 0.9 v, p <- p - lr v
    g = jax.grad(lambda q: query_loss(by_name, q, x, y)[0])(p)
    v = jax.tree.map(lambda a, b: b + 0.9 * a, v, g)
    p = jax.tree.map(lambda a, b: a - 0.2 * b, p, v)
  chex.assert_trees_all_close(by_name.adapt(meta, x, y, None), p, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(as_tx.adapt(meta, x, y, None), p, rtol=1e-5, atol=1e-6)
  sgd = MAML(apply, inner_steps=3, inner_lr=0.2).adapt(meta, x, y, None)
  assert not np.allclose(sgd["head"]["w"], p["head"]["w"])  # the choice matters


def test_meta_sgd_learned_rates_are_the_inner_transform_and_get_gradients():
  apply, meta, x, y = _linear_task(2)
  learner = MAML(apply, inner_steps=1, inner_lr=0.3, meta_sgd=True)
  meta = learner.init_meta_params(meta["model"])
  rates = jax.tree.map(lambda r: r * jnp.linspace(0.5, 1.5, r.size).reshape(r.shape),
                       meta["inner_lr"])
  meta = {**meta, "inner_lr": rates}
  g = jax.grad(lambda q: query_loss(learner, q, x, y)[0])(meta["model"])
  by_hand = jax.tree.map(lambda p, r, gg: p - r * gg, meta["model"], rates, g)
  chex.assert_trees_all_close(learner.adapt(meta, x, y, None), by_hand, rtol=1e-6, atol=1e-6)
  grads = jax.grad(lambda m: query_loss(learner, learner.adapt(m, x, y, None), x, y)[0])(meta)
  assert float(jnp.abs(grads["inner_lr"]["head"]["w"]).max()) > 0


def test_outer_optimizer_comes_from_the_config():
  cfg = preset("tiny", outer_optimizer="sgd", outer_lr=0.5)
  exp = build_experiment(cfg, (16, 16, 1))
  state = init_train_state(exp.learner.init(jax.random.key(0)), exp.optimizer)
  grads = jax.tree.map(jnp.ones_like, state.meta_params)
  updates, _ = exp.optimizer.update(grads, state.opt_state, state.meta_params)
  chex.assert_trees_all_close(updates, jax.tree.map(lambda g: -0.5 * g, grads))
  assert isinstance(build_experiment(preset("tiny"), (16, 16, 1)).optimizer.init(
      state.meta_params)[0], optax.ScaleByAdamState)          # Adam by default
  with pytest.raises(ConfigError, match="--meta_sgd"):
    validate(preset("tiny", meta_sgd=True, inner_optimizer="adam"))
  with pytest.raises(ConfigError, match="--outer_optimizer='rprop'"):
    validate(preset("tiny", outer_optimizer="rprop"))


def test_test_phase_takes_the_evaluation_steps_and_is_second_order():
  cfg = preset("tiny", inner_steps=1, eval_inner_steps=7, first_order=True, remat=True)
  exp = build_experiment(cfg, (16, 16, 1))
  assert (exp.learner.inner_steps, exp.learner.first_order, exp.learner.remat) == (1, True, True)
  assert (exp.test_learner.inner_steps, exp.test_learner.first_order,
          exp.test_learner.remat) == (7, False, False)
  assert get_objective(cfg) is natural
