"""ProtoNet, R2-D2 and MetaOptNet-SVM (advmaml/learners/): closed forms on hand-made
embeddings, finite-difference gradients, the batch-norm rule, vmap/jit, and Conv4 end to end.

Most tests use a linear "backbone" f(x) = flatten(x) @ w with w = I, so the
support embeddings are whatever the test writes into the images, and a gradient
with respect to the support images is one with respect to the embeddings.
"""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from advmaml.config import Config, ConfigError, validate
from advmaml.learners import metaoptnet, protonet, qp, r2d2
from advmaml.models import ModelSpec, make_model

LEARNERS = {"protonet": protonet, "r2d2": r2d2, "metaoptnet": metaoptnet}


def linear_model(dim: int, freeze=None) -> ModelSpec:
  """A ModelSpec whose features are flatten(x) @ w, w initialised to the identity (dim x dim)."""
  features = lambda params, x: x.reshape(x.shape[0], -1) @ params["w"]
  return ModelSpec(init=lambda key: {"w": jnp.eye(dim), "head": {"kernel": jnp.zeros((dim, 2))}},
                   apply=features, features=features, freeze_batch_stats=freeze)


def images(embeddings) -> jax.Array:
  """Embeddings (B, D) as (B, D, 1, 1) 'images' of the linear model."""
  e = jnp.asarray(embeddings)
  return e.reshape(e.shape[0], e.shape[1], 1, 1)


def query_loss(learner, meta_params, sx, sy, qx, qy):
  logits = learner.logits(learner.adapt(meta_params, sx, sy, None), qx)
  return optax.softmax_cross_entropy_with_integer_labels(logits, qy).mean()


def to64(tree):
  return jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), tree)


# -- closed forms --------------------------------------------------------------

@pytest.mark.parametrize("normalize,scale", [(False, 1.0), (True, 1.0), (False, 2.0)])
def test_protonet_logits_on_hand_made_embeddings(normalize, scale):
  learner = protonet.ProtoNet(linear_model(2), 2, learn_scale=scale != 1.0, init_scale=scale,
                              normalize=normalize)
  meta = learner.init(jax.random.PRNGKey(0))
  assert set(meta) == ({"model", "log_scale"} if scale != 1.0 else {"model"})
  assert "head" not in meta["model"]
  # Prototypes (1, 0) and (0, 3); squared distances of (1, 1): 1 and 5, of (0, 3): 10 and 0.
  state = learner.adapt(meta, images([[0, 0], [2, 0], [0, 2], [0, 4]]), jnp.array([0, 0, 1, 1]))
  np.testing.assert_allclose(state["prototypes"], [[1, 0], [0, 3]])
  logits = learner.logits(state, images([[1, 1], [0, 3]]))
  want = -scale * np.array([[1, 5], [10, 0]]) / (2 if normalize else 1)
  np.testing.assert_allclose(logits, want, rtol=1e-6, atol=1e-6)


def test_protonet_expanded_distances_match_direct_ones(x64):
  rng = np.random.default_rng(0)
  q, c = rng.normal(size=(7, 5)), rng.normal(size=(3, 5))
  direct = ((q[:, None] - c[None]) ** 2).sum(-1)
  np.testing.assert_allclose(protonet.squared_distances(jnp.asarray(q), jnp.asarray(c)), direct,
                             rtol=1e-12)


@pytest.mark.parametrize("shape", [(6, 10), (12, 4)])   # S < D (Woodbury pays) and S > D
def test_r2d2_woodbury_equals_primal_ridge(x64, shape):
  rng = np.random.default_rng(shape[0])
  x, y = jnp.asarray(rng.normal(size=shape)), jax.nn.one_hot(rng.integers(0, 3, shape[0]), 3)
  for lam in (1e-2, 1.0, 30.0):
    np.testing.assert_allclose(r2d2.ridge_weights(x, y, lam), r2d2.ridge_weights_primal(x, y, lam),
                               rtol=1e-9, atol=1e-12)


def test_r2d2_logits_on_orthonormal_embeddings():
  """Support embeddings e_0..e_3 (X = I): ridge weights are Y / (1 + lambda)."""
  learner = r2d2.R2D2(linear_model(4), 2, init_lambda=3.0, init_scale=2.0, ridge_bias=False)
  meta = learner.init(jax.random.PRNGKey(0))
  assert set(meta) == {"model", "log_scale", "offset", "log_lambda"}
  meta = {**meta, "offset": jnp.float32(0.5)}
  state = learner.adapt(meta, images(np.eye(4)), jnp.array([0, 0, 1, 1]))
  np.testing.assert_allclose(state["weights"], np.eye(2).repeat(2, 0) / 4, rtol=1e-6)
  logits = learner.logits(state, images([[1, 0, 0, 0], [0, 0, 1, 1]]))
  np.testing.assert_allclose(logits, 2 * np.array([[0.25, 0], [0, 0.5]]) + 0.5, rtol=1e-6)


def test_svm_fits_the_qp_solution_and_separates_clusters():
  rng = np.random.default_rng(0)
  centres = 4 * np.array([[1, 0], [-0.5, 0.9], [-0.5, -0.9]])
  sy, qy = np.repeat(np.arange(3), 3), np.repeat(np.arange(3), 10)
  sx = centres[sy] + 0.3 * rng.normal(size=(9, 2))
  qx = centres[qy] + 0.3 * rng.normal(size=(30, 2))
  learner = metaoptnet.MetaOptNetSVM(linear_model(2), 3, C=1.0, iterations=200)
  meta = learner.init(jax.random.PRNGKey(0))
  state = learner.adapt(meta, images(sx), jnp.asarray(sy))
  alpha = qp.crammer_singer(jnp.asarray(sx @ sx.T, jnp.float32), jax.nn.one_hot(sy, 3), C=1.0,
                            iterations=200)
  np.testing.assert_allclose(state["weights"], sx.T @ alpha, rtol=1e-4, atol=1e-6)
  logits = learner.logits(state, images(qx))
  assert logits.shape == (30, 3)
  assert float((logits.argmax(-1) == qy).mean()) == 1.0


# -- gradients ------------------------------------------------------------------

def fd_check(learner, meta, sx, sy, qx, qy, fd_learner=None, eps=1e-6):
  """Analytic gradients w.r.t. the support images (= embeddings) and every meta-parameter
  against central differences on every coordinate (float64). Returns the max abs errors."""
  fd_learner = fd_learner or learner
  grad_sx, grad_meta = jax.grad(lambda s, m: query_loss(learner, m, s, sy, qx, qy), (0, 1))(sx, meta)
  flat, unravel = jax.flatten_util.ravel_pytree((sx, meta))
  f = jax.jit(jax.vmap(lambda e: query_loss(fd_learner, unravel(flat + e)[1], unravel(flat + e)[0],
                                            sy, qx, qy)))
  steps = eps * jnp.eye(flat.size)
  fd = (f(steps) - f(-steps)) / (2 * eps)
  analytic = jax.flatten_util.ravel_pytree((grad_sx, grad_meta))[0]
  assert float(jnp.abs(fd).max()) > 1e-3
  return float(jnp.abs(analytic - fd).max()), float(jnp.abs(fd).max())


def fd_task(seed, n_way=3, shots=2, queries=2, dim=4):
  rng = np.random.default_rng(seed)
  sy, qy = np.repeat(np.arange(n_way), shots), np.repeat(np.arange(n_way), queries)
  centres = rng.normal(size=(n_way, dim))
  sx = centres[sy] + 0.7 * rng.normal(size=(sy.size, dim))
  qx = centres[qy] + 0.7 * rng.normal(size=(qy.size, dim))
  return images(sx), jnp.asarray(sy), images(qx), jnp.asarray(qy)


@pytest.mark.parametrize("name", ["protonet", "r2d2", "metaoptnet"])
def test_meta_gradients_match_finite_differences(x64, name):
  sx, sy, qx, qy = fd_task(0)
  sx, qx = to64(sx), to64(qx)
  model = linear_model(4)
  if name == "protonet":
    learner = fd_learner = protonet.ProtoNet(model, 3, learn_scale=True, init_scale=0.7)
  elif name == "r2d2":
    learner = fd_learner = r2d2.R2D2(model, 3, init_lambda=0.5, init_scale=3.0)
  else:   # C small enough that some alpha sit at their bound
    learner = metaoptnet.MetaOptNetSVM(model, 3, C=0.2, init_scale=2.0, iterations=300)
    fd_learner = metaoptnet.MetaOptNetSVM(model, 3, C=0.2, init_scale=2.0, iterations=3000)
  meta = to64(learner.init(jax.random.PRNGKey(0)))
  meta["model"]["w"] = meta["model"]["w"] + 0.1 * jnp.asarray(
      np.random.default_rng(1).normal(size=(4, 4)))
  error, scale = fd_check(learner, meta, sx, sy, qx, qy, fd_learner)
  assert error < 1e-7 * max(scale, 1), (error, scale)


def test_r2d2_offset_gets_no_gradient():
  """beta shifts every logit equally: softmax cross-entropy ignores it."""
  sx, sy, qx, qy = fd_task(1)
  learner = r2d2.R2D2(linear_model(4), 3)
  grads = jax.grad(lambda m: query_loss(learner, m, sx, sy, qx, qy))(learner.init(jax.random.PRNGKey(0)))
  assert abs(float(grads["offset"])) < 1e-6
  assert abs(float(grads["log_lambda"])) > 1e-6 and abs(float(grads["log_scale"])) > 1e-6


# -- the protocol on Conv4 -----------------------------------------------------

N_WAY = 5


def conv4():
  return make_model(N_WAY, (28, 28, 1), filters=8, model="conv4", kernels="reference")


def conv4_tasks(num_tasks=2, shots=1, queries=2):
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  sx = jax.random.uniform(k1, (num_tasks, N_WAY * shots, 28, 28, 1))
  qx = jax.random.uniform(k2, (num_tasks, N_WAY * queries, 28, 28, 1))
  sy = jnp.tile(jnp.repeat(jnp.arange(N_WAY), shots), (num_tasks, 1))
  qy = jnp.tile(jnp.repeat(jnp.arange(N_WAY), queries), (num_tasks, 1))
  return sx, sy, qx, qy


@pytest.mark.parametrize("batch_norm", ["batch", "support"])
@pytest.mark.parametrize("name", ["protonet", "r2d2", "metaoptnet"])
def test_conv4_meta_gradient_is_finite_and_nonzero_under_vmap_and_jit(name, batch_norm):
  learner = LEARNERS[name].from_config(Config(n_way=N_WAY, batch_norm=batch_norm), conv4(),
                                       phase="train")
  meta = learner.init(jax.random.PRNGKey(0))
  sx, sy, qx, qy = conv4_tasks()

  @jax.jit
  def step(meta):
    def loss(meta):
      per_task = jax.vmap(lambda *t: query_loss(learner, meta, *t))(sx, sy, qx, qy)
      return per_task.mean()
    logits = jax.vmap(lambda s, y, q: learner.logits(learner.adapt(meta, s, y, None), q))(sx, sy, qx)
    return jax.value_and_grad(loss)(meta), logits

  (loss, grads), logits = step(meta)
  assert logits.shape == (2, N_WAY * 2, N_WAY)
  assert np.isfinite(float(loss))
  leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  norm = float(optax.tree.norm(grads["model"]))
  assert norm > 1e-6
  if "log_scale" in grads:
    assert abs(float(grads["log_scale"])) > 1e-8
  if batch_norm == "support":   # non-transductive: a query's logits ignore the other queries
    state = learner.adapt(meta, sx[0], sy[0], None)
    np.testing.assert_allclose(learner.logits(state, qx[0, :3]), learner.logits(state, qx[0])[:3],
                               rtol=1e-4, atol=1e-5)


def test_batch_norm_batch_is_transductive():
  """With each batch's own statistics (MAML's rule) a query's logits depend on its batch."""
  learner = protonet.from_config(Config(n_way=N_WAY), conv4())
  meta = learner.init(jax.random.PRNGKey(0))
  sx, sy, qx, _ = conv4_tasks(1)
  state = learner.adapt(meta, sx[0], sy[0], None)
  assert not np.allclose(learner.logits(state, qx[0, :3]), learner.logits(state, qx[0])[:3],
                         rtol=1e-3)


# -- configuration ---------------------------------------------------------------

def test_from_config_reads_n_way_batch_norm_and_phase():
  model = linear_model(3, freeze=lambda params, x: params)   # no batch norm: nothing to freeze
  cfg = Config(n_way=7, batch_norm="support")
  for module in LEARNERS.values():
    learner = module.from_config(cfg, model, phase="train")
    assert (learner.n_way, learner.batch_norm) == (7, "support")
    hash(learner)   # a static jit argument
    with pytest.raises(ValueError, match="phase"):
      module.from_config(cfg, model, phase="eval")
  svm = Config(learner="metaoptnet", svm_iterations=7, svm_eval_iterations=9, svm_c=0.5)
  assert metaoptnet.from_config(svm, model, phase="test").iterations == 9
  assert metaoptnet.from_config(svm, model).iterations == 7
  assert metaoptnet.from_config(svm, model).C == 0.5
  assert metaoptnet.from_config(cfg, model).iterations == Config().svm_iterations == 50


def test_from_config_reads_each_heads_fields_and_validation_refuses_the_others():
  model = linear_model(3)
  proto = protonet.from_config(Config(learner="protonet", head_scale=2.5, protonet_learn_scale=True,
                                      protonet_normalize=True), model)
  assert (proto.init_scale, proto.learn_scale, proto.normalize) == (2.5, True, True)
  assert protonet.from_config(Config(learner="protonet"), model).init_scale == 1.0
  ridge = r2d2.from_config(Config(learner="r2d2", r2d2_lambda=0.3, head_scale=4.0), model)
  assert (ridge.init_lambda, ridge.init_scale) == (0.3, 4.0)
  assert r2d2.from_config(Config(learner="r2d2"), model).init_scale == 10.0
  assert metaoptnet.from_config(Config(learner="metaoptnet", head_scale=3.0), model).init_scale == 3.0
  # The fields reach the logits: a doubled ProtoNet scale doubles them.
  sx, sy = images(jax.random.normal(jax.random.key(0), (6, 3))), jnp.repeat(jnp.arange(3), 2)
  logits = lambda scale: (lambda l: l.logits(l.adapt(l.init(jax.random.key(1)), sx, sy), sx))(
      protonet.from_config(Config(learner="protonet", head_scale=scale), model))
  np.testing.assert_allclose(logits(2.0), 2 * logits(1.0), rtol=1e-6)
  for bad, match in [(dict(learner="maml", svm_c=1.0), "metaoptnet's"),
                     (dict(learner="protonet", r2d2_lambda=2.0), "r2d2's"),
                     (dict(learner="r2d2", protonet_normalize=True), "protonet's"),
                     (dict(learner="maml", head_scale=2.0), "head_scale"),
                     (dict(learner="transfer", transfer_classes=10, head_scale=2.0), "head_scale"),
                     (dict(learner="metaoptnet", svm_c=0.0), "svm_c"),
                     (dict(learner="metaoptnet", svm_eval_iterations=0), "svm_eval_iterations"),
                     (dict(learner="protonet", head_scale=-1.0), "head_scale"),
                     (dict(train_k_shot=-1), "train_k_shot")]:
    with pytest.raises(ConfigError, match=match):
      validate(Config(**bad))
  validate(Config(learner="metaoptnet", svm_c=1.0, head_scale=2.0, train_k_shot=5))


def test_rejects_bad_settings():
  model = linear_model(3)
  with pytest.raises(ValueError, match="batch_norm"):
    protonet.ProtoNet(model, 3, batch_norm="running")
  with pytest.raises(ValueError, match="freeze_batch_stats"):
    r2d2.R2D2(model, 3, batch_norm="support")   # the linear model has no batch norm to freeze
  with pytest.raises(ValueError, match="positive"):
    r2d2.R2D2(model, 3, init_lambda=0.0)
  with pytest.raises(ValueError, match="positive"):
    metaoptnet.MetaOptNetSVM(model, 3, C=-1.0)
  with pytest.raises(ValueError, match="2 classes"):
    protonet.ProtoNet(model, 1)
