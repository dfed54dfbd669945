"""The transfer baseline: episodes' class indices, the C-way objective (clean and adversarial),
the nearest-centroid test head, and a run through train and evaluate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from advmaml.adversary import attacks
from advmaml.config import ConfigError, preset, validate, validate_against_data
from advmaml.data.episodes import sample_episode, sample_episodes
from advmaml.eval.trained_runs import evaluate_trained, load_trained
from advmaml.learners import cross_entropy, make_learner, protonet
from advmaml.learners.transfer import TransferBaseline
from advmaml.models import make_model
from advmaml.objectives import get_objective
from advmaml.objectives.transfer import transfer
from advmaml.train.meta_step import init_train_state, make_train_step
from advmaml.train.training import train
from test_learner_protocol import toy_pool

CLASSES = 12


@pytest.fixture(scope="module")
def baseline():
  return TransferBaseline(make_model(3, (16, 16, 1), filters=8, kernels="reference"), 3,
                          num_classes=CLASSES)


def test_episodes_carry_the_pool_index_of_each_label():
  pool = toy_pool(CLASSES)
  episode = sample_episode(jnp.asarray(pool), jax.random.key(3), 3, 2, 1)
  classes = np.asarray(episode.classes)
  assert classes.shape == (3,) and len(set(classes)) == 3
  images = np.asarray(episode.support_x[..., 0] * 255).round().astype(np.uint8)
  for image, label in zip(images, np.asarray(episode.support_y)):
    assert any((image == drawn).all() for drawn in pool[classes[label]])  # its class's own image
  batch = sample_episodes(jnp.asarray(pool), jax.random.key(4), 5, 3, 1, 1)
  assert batch.classes.shape == (5, 3)


def test_the_objective_is_c_way_cross_entropy_on_every_image_with_split_labels(baseline):
  pool = jnp.asarray(toy_pool(CLASSES))
  task = sample_episode(pool, jax.random.key(0), 3, 2, 1)
  meta = baseline.init(jax.random.key(1))
  loss, metrics = transfer(baseline, meta, task, jax.random.key(2))
  images = jnp.concatenate([task.support_x, task.query_x])
  labels = task.classes[jnp.concatenate([task.support_y, task.query_y])]
  head = meta["classifier"]
  logits = make_model(3, (16, 16, 1), filters=8, kernels="reference").features(
      {**meta["model"], "head": {}}, images) @ head["kernel"] + head["bias"]
  np.testing.assert_allclose(loss, optax.softmax_cross_entropy_with_integer_labels(
      logits, labels).mean(), rtol=1e-5)
  assert set(metrics) == {"loss", "accuracy"}
  # Adversarial: the loss is the cross-entropy at the attack's points, which raise it.
  cfg = attacks.AttackConfig(name="pgd", norm="linf", epsilon=0.1, steps=3, restarts=1,
                             loss="ce", track_best=True)
  adv_loss, adv_metrics = transfer(baseline, meta, task, jax.random.key(2), attack_cfg=cfg)
  x_adv = attacks.attack(cfg, lambda p, x: baseline.classify(p, x), meta, images, labels,
                         jax.random.key(2)).x_adv
  np.testing.assert_allclose(adv_loss, cross_entropy(baseline.classify(meta, x_adv), labels)[0],
                             rtol=1e-5)
  assert adv_loss > loss and adv_metrics["adv_accuracy"] <= metrics["accuracy"]


def test_the_test_head_is_nearest_centroid_on_the_features(baseline):
  meta = baseline.init(jax.random.key(1))
  task = sample_episode(jnp.asarray(toy_pool(CLASSES)), jax.random.key(5), 3, 2, 2)
  state = baseline.adapt(meta, task.support_x, task.support_y)
  features = lambda x: baseline.model.features({**meta["model"], "head": {}}, x)
  centres = protonet.prototypes(features(task.support_x), task.support_y, 3)
  direct = -((features(task.query_x)[:, None] - centres[None]) ** 2).sum(-1)
  np.testing.assert_allclose(baseline.logits(state, task.query_x), direct, rtol=1e-4, atol=1e-4)


def test_training_learns_the_twelve_way_classification(baseline):
  pool = jnp.asarray(toy_pool(CLASSES))
  opt = optax.adam(3e-3)
  state = init_train_state(baseline.init(jax.random.key(0)), opt)
  step = make_train_step(baseline, transfer, opt, meta_batch_size=4, n_way=3, k_shot=2, q_query=2)
  accuracies = []
  for i in range(25):
    state, metrics = step(state, pool, jax.random.key(i))
    accuracies.append(float(metrics["accuracy"]))
  # 12-way: chance is 1/12; measured 0.11 over the first 5 steps, 0.38 over the last 5.
  assert np.mean(accuracies[-5:]) > 2 * np.mean(accuracies[:5])
  assert np.mean(accuracies[-5:]) > 3 / CLASSES


def test_config_wiring_and_one_line_refusals(fake_omniglot_dir, isolated_cache, tmp_path):
  cfg = preset("tiny", data_dir=str(fake_omniglot_dir), learner="transfer", objective="transfer_at",
               train_attack_steps=2)
  with pytest.raises(ConfigError, match="transfer_classes"):
    validate(cfg)
  with pytest.raises(ConfigError, match="use --learner=transfer"):
    validate(preset("tiny", objective="transfer"))
  pools = {"train": np.zeros((40, 20, 4, 4), np.uint8)}
  with pytest.raises(ConfigError, match="--transfer_classes=40"):
    validate_against_data(cfg.replace(transfer_classes=39), pools)
  # The fake Omniglot's background characters, four rotations each, are the train classes.
  from advmaml.data.sources import load_class_splits
  num_classes = load_class_splits("omniglot", data_dir=str(fake_omniglot_dir))["train"].images.shape[0]
  cfg = cfg.replace(transfer_classes=num_classes)
  validate(cfg)
  assert isinstance(make_learner(cfg, make_model(3, (28, 28, 1), filters=8)), TransferBaseline)
  assert get_objective(cfg).func is transfer
  train(cfg, tmp_path)
  run, splits = load_trained(tmp_path)
  assert run.meta_params["classifier"]["kernel"].shape == (8 * 2 * 2, num_classes)
  record = evaluate_trained(run, splits, num_episodes=4)
  assert 0.0 <= record["metrics"]["accuracy"]["mean"] <= 1.0


def test_one_classifier_serves_both_shots_when_trained_on_the_same_batches(
    fake_omniglot_dir, isolated_cache, tmp_path):
  """A 3-shot transfer run trained on 1+1-image-per-class episodes (--train_k_shot=1
  --q_query=1, as robust_table.sh's 5-shot transfer rows) learns the 1-shot run's
  classifier bit for bit; only its evaluation episodes (3 support images a class) differ."""
  from advmaml.data.sources import load_class_splits
  num_classes = load_class_splits("omniglot", data_dir=str(fake_omniglot_dir))["train"].images.shape[0]
  one = preset("tiny", data_dir=str(fake_omniglot_dir), learner="transfer", objective="transfer_at",
               train_attack_steps=2, transfer_classes=num_classes, k_shot=1, q_query=1,
               eval_q_query=1, num_steps=3)
  three = one.replace(k_shot=3, train_k_shot=1, eval_q_query=3)
  train(one, tmp_path / "one")
  train(three, tmp_path / "three")
  (run_one, _), (run_three, splits) = load_trained(tmp_path / "one"), load_trained(tmp_path / "three")
  jax.tree.map(np.testing.assert_array_equal, run_one.meta_params, run_three.meta_params)
  record = evaluate_trained(run_three, splits, num_episodes=2)
  assert (record["k_shot"], record["q_query"]) == (3, 3)
