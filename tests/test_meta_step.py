"""The meta-gradient taken in chunks of tasks equals the one taken over all tasks at once."""

from __future__ import annotations

import dataclasses

import chex
import jax
import numpy as np
import pytest

from advmaml.learners import query_loss
from advmaml.config import ConfigError, preset, validate
from advmaml.train.meta_step import (AUTO_TASK_CHUNK, init_train_state, make_train_step,
                               resolve_task_chunk)
from advmaml.objectives import get_objective
from advmaml.train.training import build_experiment

META_BATCH = 8


def build(objective_name: str, task_chunk: int):
  cfg = preset("tiny", meta_batch_size=META_BATCH, objective=objective_name)
  exp = build_experiment(cfg, (16, 16, 1))
  pool = np.random.default_rng(0).integers(0, 256, (12, 6, 16, 16), dtype=np.uint8)
  state = init_train_state(exp.learner.init_meta_params(exp.model.init(jax.random.key(0))),
                           exp.optimizer)
  step = make_train_step(exp.learner, get_objective(cfg), exp.optimizer,
                         meta_batch_size=META_BATCH, n_way=cfg.n_way, k_shot=cfg.k_shot,
                         q_query=cfg.q_query, task_chunk=task_chunk)
  return step, state, pool


def run_steps(objective_name: str, task_chunk: int, steps: int = 2):
  step, state, pool = build(objective_name, task_chunk)
  history = []
  for _ in range(steps):
    state, metrics = step(state, pool, jax.random.key(1))
    history.append(metrics)
  return jax.device_get(state.meta_params), jax.device_get(history)


def count_loops(objective_name: str, task_chunk: int) -> int:
  step, state, pool = build(objective_name, task_chunk)
  return step.lower(state, pool, jax.random.key(1)).as_text().count("stablehlo.while")


# One task per chunk (the CPU default) and chunks of several vmapped tasks; one
# pair per objective, because each compile of a second-order step is slow on CPU.
@pytest.mark.parametrize("objective_name,chunk", [("natural", 1), ("aq", 4)])
def test_chunked_meta_gradient_matches_all_tasks_at_once(objective_name, chunk):
  params_all, metrics_all = run_steps(objective_name, task_chunk=0)
  params, metrics = run_steps(objective_name, task_chunk=chunk)
  chex.assert_trees_all_close(params, params_all, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(metrics, metrics_all, atol=1e-5, rtol=1e-4)  # float32 sums
  # The chunked step really loops over chunks: one more while loop than the vmapped one.
  assert count_loops(objective_name, 2) > count_loops(objective_name, 0)
  assert count_loops(objective_name, META_BATCH) == count_loops(objective_name, 0)


def test_chunk_must_divide_the_meta_batch():
  step, state, pool = build("natural", task_chunk=3)
  with pytest.raises(ValueError, match="task_chunk=3"):
    step(state, pool, jax.random.key(1))
  with pytest.raises(ConfigError, match="--task_chunk=3"):
    validate(preset("tiny", meta_batch_size=8, task_chunk=3))
  with pytest.raises(ConfigError, match="--task_chunk=-2"):
    validate(preset("tiny", task_chunk=-2))
  validate(preset("tiny", meta_batch_size=8, task_chunk=4))


def test_auto_chunk_is_one_task_per_device_on_cpu():
  assert resolve_task_chunk(0) == 0 and resolve_task_chunk(4, num_devices=2) == 4
  expected = 2 if jax.default_backend() == "cpu" else 0
  assert resolve_task_chunk(AUTO_TASK_CHUNK, num_devices=2) == expected


def adapted_query_loss(learner, meta_params, episode, key):
  fast = learner.adapt(meta_params, episode.support_x, episode.support_y, key)
  loss, accuracy = query_loss(learner, fast, episode.query_x, episode.query_y)
  return {"loss": loss, "accuracy": accuracy}


def test_evaluation_gives_the_same_episodes_one_at_a_time_or_vmapped():
  import functools
  from advmaml.eval.evaluation import _evaluate_batch
  cfg = preset("tiny")
  exp = build_experiment(cfg, (16, 16, 1))
  meta = exp.learner.init_meta_params(exp.model.init(jax.random.key(0)))
  pool = np.random.default_rng(0).integers(0, 256, (12, 6, 16, 16), dtype=np.uint8)
  metric = adapted_query_loss
  run = lambda chunk: jax.device_get(_evaluate_batch(
      meta, pool, jax.random.key(3), 0, learner=dataclasses.replace(exp.learner, inner_steps=2),
      metric_fn=metric, n_way=3,
      k_shot=1, q_query=2, batch_tasks=6, task_chunk=chunk))
  vmapped = run(0)
  assert np.ptp(vmapped["loss"]) > 0                       # six different episodes
  for chunk in (1, 2):
    # float32 through two inner steps: the chunked program sums in another order
    # (2.7e-5 apart at loss 1.73 under jax 0.10.2); a wrong episode or key is O(1) off.
    chex.assert_trees_all_close(run(chunk), vmapped, atol=1e-4, rtol=1e-4)
