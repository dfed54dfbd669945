"""The adversarial-querying ResNet-12 presets (Goldblum et al. 2020) and --train_k_shot.

The presets are checked setting by setting against the paper's code, and one of
them trains on tiny Mini-ImageNet pickles in the real format (tests/test_mini_imagenet.py)
with only the sizes shrunk; --train_k_shot is checked where training samples its
episodes and where the data is validated.
"""

from __future__ import annotations

import numpy as np
import pytest

from advmaml import config
from advmaml.config import ConfigError, preset, train_k_shot, validate, validate_against_data
from advmaml.eval.trained_runs import load_trained
from advmaml.train import training
import test_mini_imagenet

AQ_PRESETS = [f"{data}_aq_5w{k}s" for data in ("mini_imagenet", "cifar_fs") for k in (1, 5)]


@pytest.mark.parametrize("name", AQ_PRESETS)
def test_aq_presets_carry_the_papers_settings(name):
  cfg = preset(name)
  validate(cfg)
  assert (cfg.model, cfg.learner, cfg.objective, cfg.n_way) == ("resnet12", "metaoptnet", "aq", 5)
  assert cfg.k_shot == int(name[-2]) and train_k_shot(cfg) == 15
  assert (cfg.q_query, cfg.eval_q_query, cfg.meta_batch_size) == (6, 15, 8)
  np.testing.assert_allclose([cfg.train_epsilon, cfg.train_step_size], [8 / 255, 2 / 255])
  assert cfg.train_attack == "pgd" and cfg.train_attack_steps == 7
  assert (cfg.outer_optimizer, cfg.outer_lr) == ("nesterov", 0.1)
  assert cfg.image_size == (84 if name.startswith("mini") else 32)
  assert name in config.presets_markdown()


def test_train_k_shot_defaults_to_k_shot_and_is_checked_against_the_data():
  cfg = preset("tiny")
  assert train_k_shot(cfg) == cfg.k_shot == 1
  assert train_k_shot(cfg.replace(train_k_shot=4)) == 4
  pools = {"train": np.zeros((5, 3, 4, 4), np.uint8), "val": np.zeros((5, 20, 4, 4), np.uint8)}
  with pytest.raises(ConfigError, match="--train_k_shot=4 plus --q_query=2 needs 6"):
    validate_against_data(cfg.replace(train_k_shot=4), pools)
  validate_against_data(cfg.replace(train_k_shot=1), pools)   # the val split keeps k_shot


def test_an_aq_preset_trains_on_tiny_mini_imagenet_with_its_training_shot(tmp_path, monkeypatch):
  """mini_imagenet_aq_5w1s, sizes shrunk (3 images per class in the fakes): one AQ meta-step
  of MetaOptNet-SVM on a ResNet-12, episodes of 2 shots per class in training, 1 at test."""
  monkeypatch.setattr(test_mini_imagenet, "PER_CLASS", 3)   # 2 support + 1 query per class
  test_mini_imagenet.write_pickles(tmp_path / "data")
  shots = []
  make_step = training.make_train_step
  monkeypatch.setattr(training, "make_train_step",
                      lambda *a, **kw: shots.append(kw["k_shot"]) or make_step(*a, **kw))
  cfg = preset("mini_imagenet_aq_5w1s", data_dir=str(tmp_path / "data"), filters=2,
               train_k_shot=2, q_query=1, eval_q_query=1, meta_batch_size=1,
               num_steps=1, eval_every=0, log_every=1, checkpoint_every=1, train_attack_steps=2,
               svm_iterations=5, svm_eval_iterations=5, val_episodes=2)
  training.train(cfg, tmp_path / "run")
  assert shots == [2]
  run, _ = load_trained(tmp_path / "run")
  assert run.cfg.learner == "metaoptnet" and run.step == 1
