"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=4: evaluates the same
episodes with each call split over 4 devices and on one device, clean and under a
PGD attack with a random start; prints a JSON verdict."""

import json

import jax
import numpy as np

from advmaml.eval import robust_eval
from advmaml.runtime import sharding
from advmaml.config import preset
from advmaml.eval.evaluation import _evaluate_batch, evaluate_episodes
from advmaml.train.training import build_experiment

cfg = preset("tiny", n_way=3, k_shot=1, q_query=2, filters=8)
# The CPU kernels sized for one device's share of the cores, for each layout.
exps = {n: build_experiment(cfg, (16, 16, 1), n) for n in (1, 4)}
meta = exps[1].learner.init(jax.random.key(0))   # tiny: 2 inner steps at test
pool = np.random.default_rng(0).integers(0, 256, (12, 20, 16, 16), dtype=np.uint8)
metric = robust_eval.make_metric_fn(["pgd"], [0.05], n_way=3, steps=3)

kw = dict(num_episodes=10, n_way=3, k_shot=1, q_query=2, batch_tasks=6,
          metric_fn=metric)
summary = {}
for n in (1, 4):
  summary[n] = evaluate_episodes(exps[n].test_learner, meta, pool, jax.random.key(3), **kw,
                                 mesh=sharding.make_mesh(n) if n > 1 else None)
per_episode, devices_used = {}, {}
for n in (1, 4):
  mesh = sharding.make_mesh(n)
  out = _evaluate_batch(sharding.replicate(meta, mesh), sharding.replicate(pool, mesh),
                        jax.random.key(3), 0, learner=exps[n].test_learner, metric_fn=metric, n_way=3,
                        k_shot=1, q_query=2, batch_tasks=8, mesh=mesh)
  devices_used[n] = len(out["clean_accuracy"].sharding.device_set)
  per_episode[n] = jax.device_get(out)
diff = max(float(np.abs(per_episode[1][k] - per_episode[4][k]).max()) for k in per_episode[1])
summary_diff = max(abs(summary[1][k][s] - summary[4][k][s])
                   for k in summary[1] for s in ("mean", "std"))
print(json.dumps({"devices": jax.device_count(), "devices_used_1": devices_used[1],
                  "devices_used_4": devices_used[4], "per_episode_max_diff": diff,
                  "budget_1": exps[1].model.kernels.budget.threshold_bytes,
                  "budget_4": exps[4].model.kernels.budget.threshold_bytes,
                  "summary_max_diff": summary_diff, "n": summary[4]["clean_accuracy"]["n"],
                  "metrics": sorted(per_episode[4]),
                  "robust_mean": summary[4]["robust_accuracy@0.05"]["mean"],
                  "clean_mean": summary[4]["clean_accuracy"]["mean"]}))
