"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=4: compares 3 meta-steps
split over 4 devices with the same steps on one device; prints a JSON verdict."""

import json

import jax
import numpy as np

from advmaml.runtime import sharding
from advmaml.config import preset
from advmaml.train.meta_step import init_train_state, make_train_step
from advmaml.objectives import natural
from advmaml.train.training import build_experiment

cfg = preset("tiny", n_way=3, k_shot=1, q_query=2, filters=8, meta_batch_size=8)
pool = np.random.default_rng(0).integers(0, 256, (12, 20, 16, 16), dtype=np.uint8)

results, hlo, budget = {}, {}, {}
for n in (1, 4):
  mesh = sharding.make_mesh(n)
  exp = build_experiment(cfg, (16, 16, 1), n)  # CPU kernels sized for one device's cores
  budget[n] = exp.model.kernels.budget.threshold_bytes
  state = sharding.replicate(
      init_train_state(exp.learner.init_meta_params(exp.model.init(jax.random.key(0))), exp.optimizer), mesh)
  step = make_train_step(exp.learner, natural, exp.optimizer, meta_batch_size=8, n_way=3, k_shot=1,
                         q_query=2, mesh=mesh)
  p = sharding.replicate(pool, mesh)
  hlo[n] = step.lower(state, p, jax.random.key(1)).compile().as_text()
  for _ in range(3):
    state, metrics = step(state, p, jax.random.key(1))
  results[n] = jax.device_get(state.meta_params)
diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(results[1]), jax.tree.leaves(results[4])))
scale = max(float(np.abs(a).max()) for a in jax.tree.leaves(results[1]))
print(json.dumps({"devices": jax.device_count(), "max_abs_diff": diff, "param_scale": scale,
                  "all_reduce_1": "all-reduce" in hlo[1], "all_reduce_4": "all-reduce" in hlo[4],
                  "budget_1": budget[1], "budget_4": budget[4]}))
