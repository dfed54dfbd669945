"""Progress lines of long loops: a multi-batch evaluation logs count, rate and time left."""

from __future__ import annotations

import logging
import re

import jax
import numpy as np

from advmaml.io import progress
from advmaml.config import preset
from advmaml.eval.evaluation import evaluate_episodes
from advmaml.train.training import build_experiment


def _evaluate(caplog, episodes: int) -> list[str]:
  cfg = preset("tiny")
  exp = build_experiment(cfg, (8, 8, 1))
  meta = exp.learner.init_meta_params(exp.model.init(jax.random.key(0)))
  pool = np.random.default_rng(0).integers(0, 256, (6, 20, 8, 8), dtype=np.uint8)
  with caplog.at_level(logging.INFO):
    caplog.clear()
    evaluate_episodes(exp.learner, meta, pool, jax.random.key(1), num_episodes=episodes,
                      n_way=3, k_shot=1, q_query=2, batch_tasks=2)
  return [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluation:")]


def test_a_multi_batch_evaluation_logs_progress_with_rate_and_time_left(caplog, monkeypatch):
  monkeypatch.setattr(progress, "EVERY_SECONDS", 0.0)   # a line per batch of 2 episodes
  lines = _evaluate(caplog, 5)
  assert [re.match(r"evaluation: (\d+)/5 episodes", l).group(1) for l in lines] == ["2", "4", "5"]
  assert "(100%)" in lines[-1] and all("episodes/s" in l and "left" in l for l in lines)


def test_a_short_evaluation_logs_no_progress(caplog):
  assert progress.EVERY_SECONDS == 30.0
  assert _evaluate(caplog, 5) == []   # seconds, not minutes: no lines (training's validation)


def test_a_resumed_loop_rates_only_its_own_work(caplog, monkeypatch):
  now = [100.0]
  monkeypatch.setattr(progress.time, "time", lambda: now[0])
  bar = progress.Progress("evaluation", 100, "episodes", every_seconds=0.0, done=80)
  now[0] = 110.0
  with caplog.at_level(logging.INFO):
    bar.update(90)                               # 10 episodes in 10 s, not 90
  (line,) = [r.getMessage() for r in caplog.records]
  assert "90/100 episodes (90%) | 1.00 episodes/s" in line and "left 0h00m10s" in line
