"""Kernel sets and batch-norm rules on the Conv4s: every JAX transformation on the
reference kernels, the CPU kernels against them to second order, support-set statistics."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from advmaml.eval import robust_eval
from advmaml.config import preset
from advmaml.eval.evaluation import evaluate_episodes
from advmaml.kernels import ChunkBudget, CpuKernels
from conftest import assert_leaves_close_to_scale
from advmaml.learners import MAML as Learner, cross_entropy, query_loss
from advmaml.models import make_model
from advmaml.train.training import build_experiment

N_WAY, SIZE = 3, 16
# Every registered model. ResNet-12's forms of the two tests below take 140-190 s each
# on 2 cores (16 convolutions through jax.hessian and second-order MAML), so they are
# marked slow: `pytest -m slow tests/test_kernels.py` runs them (the default run, and
# CI, skip them; its cheaper checks in tests/test_backbones.py always run).
# Until 2026-12-01 the ResNet-12 and (arrays as arguments) conv4_maxpool forms failed:
# the reference max-pool was a max reduction, whose derivative tests x == max(x), and
# XLA:CPU recomputed x in several fusions, rounded differently (docs/speed.md, "The
# max-pool derivative"; regression test in tests/test_models.py).
VARIANTS = ("conv4", "conv4_maxpool", pytest.param("resnet12", marks=pytest.mark.slow))
WIDTH = {"conv4": 3, "conv4_maxpool": 3, "resnet12": 2}       # filters in the float64 test
BATCH_NORMS = ("batch", "support")


def tiny_images(key, count):
  """(count, 16, 16, 1) images and class-major labels of a 3-way task."""
  return (jax.random.uniform(key, (count, SIZE, SIZE, 1)),
          jnp.repeat(jnp.arange(N_WAY), count // N_WAY))


def query_logits(model, batch_norm, params, support_x, query_x):
  """(Q, N) logits of the queries, normalised by their own batch or by the support set's."""
  if batch_norm == "support":
    params = model.freeze_batch_stats(params, support_x)
  return model.apply(params, query_x)


@pytest.mark.parametrize("batch_norm", BATCH_NORMS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_transformation_of_the_reference_kernels(x64, variant, batch_norm):
  """grad, grad of grad, jvp, jacfwd, hessian, linearize and the forward-over-reverse HVP
  of the loss along three parameter directions, and vmap of each over points, agree with
  finite differences and with one another (float64); so does forward mode in the images."""
  model = make_model(N_WAY, (SIZE, SIZE, 1), filters=WIDTH[variant], model=variant,
                     kernels="reference")
  to64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)
  params = to64(model.init(jax.random.key(0)))
  sx, _ = tiny_images(jax.random.key(1), 3)
  qx, qy = tiny_images(jax.random.key(2), 6)
  sx, qx = to64(sx), to64(qx)
  flat, unravel = ravel_pytree(params)
  directions = jax.random.normal(jax.random.key(3), (3, flat.size), jnp.float64) * 0.1
  v = jnp.array([0.3, -1.0, 0.7])
  # Central differences 1e-6 wide: at 1e-5 one of the filters=2 ResNet-12's max-pools or
  # leaky ReLUs switches inside the interval (its gradient is right; measured 2026-12-01).
  eps = 1e-6

  # Every array an argument, none a captured constant: both forms must be right, and
  # this one is the one the max-pool bug showed in on the Conv4s.
  @jax.jit
  def run(flat, directions, params, sx, qx, qy):
    logits = lambda p, qx: query_logits(model, batch_norm, p, sx, qx)
    g = lambda t: cross_entropy(logits(unravel(flat + t @ directions), qx), qy)[0]
    transforms = {
        "grad": jax.grad(g),
        "jacfwd": jax.jacfwd(g),
        "jvp": lambda t: jax.jvp(g, (t,), (v,))[1],
        "linearize": lambda t: jax.linearize(g, t)[1](v),
        "hessian": jax.hessian(g),
        "grad_of_grad": jax.jacrev(jax.grad(g)),
        "hvp_forward_over_reverse": lambda t: jax.jvp(jax.grad(g), (t,), (v,))[1],
    }
    t0, t1 = jnp.zeros(3), jnp.array([0.5, -0.2, 0.1])
    steps = eps * jnp.eye(3)
    # The vmapped transforms run at t0, t1 and t0 +- eps e_i (their grads: the Hessian's differences).
    points = jnp.concatenate([jnp.stack([t0, t1]), t0 + steps, t0 - steps])

    single = {name: f(t0) for name, f in transforms.items()}
    batched = {name: jax.vmap(f)(points) for name, f in transforms.items()}
    # Central differences of g at t0 and t1 along each e_i.
    shifted = jnp.concatenate([t + s for t in (t0, t1) for s in (steps, -steps)])
    values = jax.vmap(g)(shifted).reshape(2, 2, 3)
    # Forward mode in the images against reverse mode: <u, J w> and <J^T u, w>.
    f = lambda x: logits(params, x)
    w = jax.random.normal(jax.random.key(4), qx.shape)
    u = jax.random.normal(jax.random.key(5), (6, N_WAY))
    images = (jnp.vdot(u, jax.jvp(f, (qx,), (w,))[1]), jnp.vdot(jax.vjp(f, qx)[1](u)[0], w))
    return single, batched, (values[:, 0] - values[:, 1]) / (2 * eps), images

  single, batched, fd_grad, images = jax.device_get(run(flat, directions, params, sx, qx, qy))
  np.testing.assert_allclose(*images, rtol=1e-9)
  tol = dict(rtol=1e-6, atol=1e-9)
  for name in single:  # vmap of each: the batch's first point is the unbatched value
    np.testing.assert_allclose(batched[name][0], single[name], **tol, err_msg=name)
  for at, point in ((0, "t0"), (1, "t1")):
    grad = batched["grad"][at]
    hess = batched["hessian"][at]
    np.testing.assert_allclose(grad, fd_grad[at], rtol=1e-5, atol=1e-8, err_msg=point)
    np.testing.assert_allclose(batched["jacfwd"][at], grad, **tol)
    for name in ("jvp", "linearize"):
      np.testing.assert_allclose(batched[name][at], grad @ v, **tol, err_msg=name)
    np.testing.assert_allclose(batched["grad_of_grad"][at], hess, **tol)
    np.testing.assert_allclose(hess, hess.T, **tol)
    np.testing.assert_allclose(batched["hvp_forward_over_reverse"][at], hess @ v, **tol)
  fd_hessian = (batched["grad"][2:5] - batched["grad"][5:8]) / (2 * eps)  # row i: d grad / d t_i
  np.testing.assert_allclose(single["hessian"], fd_hessian, rtol=1e-4, atol=1e-7)
  assert np.abs(single["hessian"]).max() > 1e-3  # curvature there to be checked


@pytest.mark.parametrize("variant", VARIANTS)
def test_cpu_kernels_match_reference_to_second_order(variant):
  """Logits, and the meta-gradient of two vmapped tasks through two inner SGD steps (the
  gradient of an inner step's gradient), in both batch-norm modes, with every CPU im2col
  layer over chunks of 2-3 of its 6 images (a tiny budget forces them), equal the
  reference kernels' to float32 rounding."""
  tasks_x = jax.random.uniform(jax.random.key(0), (2, 12, SIZE, SIZE, 1))  # 6 support, 6 query
  y = jnp.repeat(jnp.arange(N_WAY), 2)
  # 12 filters: conv0 takes the narrow-patches path (9 columns), conv1-3 the plain one.
  forced = CpuKernels("im2col", ChunkBudget(0, 2 * 8 * 8 * 9 * 12 * 4, strides=(1, 2)))
  chunked = jax.make_jaxpr(lambda x, w: forced.conv(x, w, 1))(jnp.ones((6, 8, 8, 12)),
                                                             jnp.ones((3, 3, 12, 12)))
  assert "scan" in str(chunked)
  outputs = []
  for kernels in (forced, "reference"):
    model = make_model(N_WAY, (SIZE, SIZE, 1), filters=12 if variant != "resnet12" else 4,
                       model=variant, kernels=kernels)
    learners = [Learner(model.apply, inner_steps=2, inner_lr=0.4,
                        freeze_stats=model.freeze_batch_stats if bn == "support" else None)
                for bn in BATCH_NORMS]
    if not outputs:  # the same initial parameters for both kernel sets
      meta = learners[0].init_meta_params(model.init(jax.random.key(1)))

    def meta_loss(m, learner):  # -> (mean query loss, query logits (2, 6, N))
      def task(x):
        logits = learner.apply_fn(learner.adapt(m, x[:6], y), x[6:])
        return cross_entropy(logits, y[::-1])[0], logits
      losses, logits = jax.vmap(task)(tasks_x)
      return losses.mean(), logits

    both = lambda m, learners=learners: [jax.value_and_grad(meta_loss, has_aux=True)(m, learner)
                                         for learner in learners]
    outputs.append(jax.device_get(jax.jit(both)(meta)))
  for bn, ((_, cpu_logits), cpu_grads), ((_, ref_logits), ref_grads) in zip(BATCH_NORMS, *outputs):
    np.testing.assert_allclose(cpu_logits, ref_logits, rtol=1e-4, atol=1e-5, err_msg=bn)
    if variant != "resnet12":
      chex.assert_trees_all_close(cpu_grads, ref_grads, rtol=2e-3, atol=2e-5)
      continue
    # A 4-4-10-20 ResNet-12 on 16x16 images is ill-conditioned (its last batch norms see
    # few values; float32 summation order moves its gradients by ~0.4%,
    # tests/test_backbones.py): each leaf to 1% of its largest entry.
    assert_leaves_close_to_scale(cpu_grads, ref_grads, rel=1e-2, err_msg=bn)


@pytest.mark.parametrize("kernels", ["cpu", "reference"])
def test_support_statistics_make_each_query_independent_of_the_others(kernels):
  """batch_norm="support": perturbing one query leaves the others' logits as they were;
  with each batch's own statistics (MAML's rule) it moves them."""
  model = make_model(N_WAY, (SIZE, SIZE, 1), filters=4, model="conv4_maxpool", kernels=kernels)
  sx, sy = tiny_images(jax.random.key(1), 3)
  qx, _ = tiny_images(jax.random.key(2), 6)
  perturbed = qx.at[0].add(0.5 * jax.random.normal(jax.random.key(3), qx.shape[1:]))
  moved = {}
  for batch_norm in BATCH_NORMS:
    learner = Learner(model.apply, inner_steps=1, inner_lr=0.4,
                      freeze_stats=model.freeze_batch_stats if batch_norm == "support" else None)
    meta = learner.init_meta_params(model.init(jax.random.key(0)))
    fast = jax.jit(learner.adapt)(meta, sx, sy)
    logits = jax.jit(learner.apply_fn)
    moved[batch_norm] = float(jnp.abs(logits(fast, qx)[1:] - logits(fast, perturbed)[1:]).max())
    if batch_norm == "support":  # and the support set normalised by its own statistics, as before
      unfrozen = {k: {n: a for n, a in p.items() if n not in ("mean", "var")} for k, p in fast.items()}
      np.testing.assert_allclose(logits(fast, sx), logits(unfrozen, sx), rtol=1e-4, atol=1e-5)
  assert moved["support"] < 1e-6 and moved["batch"] > 1e-3, moved


def test_support_statistics_in_evaluation_under_attack():
  """--batch_norm=support through build_experiment: clean and PGD evaluation run on the
  adapted model with the support's statistics, and the attack lowers the accuracy."""
  cfg = preset("tiny", image_size=SIZE, filters=4, batch_norm="support")
  exp = build_experiment(cfg, (SIZE, SIZE, 1))
  assert exp.learner.freeze_stats is not None
  meta = exp.learner.init_meta_params(exp.model.init(jax.random.key(0)))
  rng = np.random.default_rng(0)
  patterns = rng.integers(0, 256, (6, 1, SIZE, SIZE))
  pool = np.clip(patterns + rng.integers(-20, 20, (6, 8, SIZE, SIZE)), 0, 255).astype(np.uint8)
  metric = robust_eval.make_metric_fn(["pgd"], [0.3], n_way=3, steps=5)
  learner = dataclasses.replace(exp.test_learner, inner_steps=5)
  out = evaluate_episodes(learner, meta, pool, jax.random.key(1), num_episodes=4, n_way=3,
                          k_shot=1, q_query=2, batch_tasks=4, metric_fn=metric)
  clean, robust = out["clean_accuracy"]["mean"], out["robust_accuracy@0.3"]["mean"]
  assert clean > 0.5 and robust < clean, out
