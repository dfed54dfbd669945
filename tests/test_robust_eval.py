"""Robust few-shot evaluation: metric invariants, poisoning, batching, plots, entry point.

Compiles dominate on a small CPU: the model is a one-hidden-layer MLP with
batch-statistics normalisation (coupling the examples of a batch, like the
Conv4's batch norm), trained by MAML for a few dozen steps on a synthetic
class pool, and each test jits one evaluation that checks all it needs.

Per-episode inequalities are checked through evaluate_episodes by a wrapper
metric that reports ``max(a - b, 0)`` per episode: its mean is 0 iff
``a <= b`` held in every episode.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
import pytest
from PIL import Image

from advmaml.eval import plots, robust_eval
from advmaml.data.episodes import sample_episodes
from advmaml.eval.evaluation import evaluate_episodes
from advmaml.learners import MAML as Learner, query_loss
from conftest import run_module as _run

N_WAY, K_SHOT, Q_QUERY, HIDDEN, EVAL_INNER = 5, 1, 3, 32, 3
EPISODES = 12


def mlp_apply(params, x):
  """(B, 8, 8, 1) -> (B, N) logits; normalised with the batch's statistics."""
  h = x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"]
  mu = h.mean(0)
  var = jnp.square(h - mu).mean(0)
  h = jax.nn.relu((h - mu) * jax.lax.rsqrt(var + 1e-5) * params["gamma"] + params["beta"])
  return h @ params["head"]["w"] + params["head"]["b"]


def synthetic_pool(seed: int = 0) -> np.ndarray:
  """(10, 20, 8, 8) uint8: a distinct binary pattern (0.2 / 0.8) per class plus +-0.15 noise."""
  rng = np.random.default_rng(seed)
  protos = rng.choice([0.2, 0.8], (10, 8, 8))
  pool = np.clip(protos[:, None] + rng.uniform(-0.15, 0.15, (10, 20, 8, 8)), 0, 1)
  return (pool * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def trained():
  """(learner, meta_params, pool) after 40 MAML steps (5-way 1-shot)."""
  rng = np.random.default_rng(1)
  f32 = lambda a: np.asarray(a, np.float32)
  params = {"w1": f32(rng.normal(size=(64, HIDDEN)) / 8), "b1": f32(np.zeros(HIDDEN)),
            "gamma": f32(np.ones(HIDDEN)), "beta": f32(np.zeros(HIDDEN)),
            "head": {"w": f32(rng.normal(size=(HIDDEN, N_WAY)) / np.sqrt(HIDDEN)),
                     "b": f32(np.zeros(N_WAY))}}
  learner = Learner(mlp_apply, inner_steps=1, inner_lr=0.4)
  opt = optax.adam(3e-3)
  meta = learner.init_meta_params(jax.tree.map(jnp.asarray, params))
  pool = synthetic_pool()

  @jax.jit
  def step(meta, opt_state, key):
    tasks = sample_episodes(jnp.asarray(pool), key, 4, N_WAY, K_SHOT, Q_QUERY)

    def loss(mp):
      def one(t):
        return query_loss(learner, learner.adapt(mp, t.support_x, t.support_y), t.query_x, t.query_y)[0]
      return jax.vmap(one)(tasks).mean()

    grads = jax.grad(loss)(meta)
    updates, opt_state = opt.update(grads, opt_state, meta)
    return optax.apply_updates(meta, updates), opt_state

  opt_state = opt.init(meta)
  for i in range(40):
    meta, opt_state = step(meta, opt_state, jax.random.key(i))
  return learner, meta, pool


def with_checks(learner, meta_params, episode, key, *, fns, checks):
  """Runs named metric fns on one episode; adds ``violation:a>b = max(a - b, 0)`` per check."""
  out = {}
  for prefix, fn in fns:
    out.update({prefix + k: v for k, v in fn(learner, meta_params, episode, key).items()})
  for a, b in checks:
    out[f"violation:{a}>{b}"] = jnp.maximum(out[a] - out[b], 0.0)
  return out


def evaluate(trained, metric_fn, *, seed=0, batch_tasks=4, num_episodes=EPISODES):
  learner, meta, pool = trained
  learner = dataclasses.replace(learner, inner_steps=EVAL_INNER)   # the "test" phase
  return evaluate_episodes(learner, meta, pool, jax.random.key(seed), num_episodes=num_episodes,
                           n_way=N_WAY, k_shot=K_SHOT, q_query=Q_QUERY,
                           batch_tasks=batch_tasks, metric_fn=metric_fn)


def assert_no_violations(results):
  # Means of separately compiled metrics may differ in the last bit for equal
  # counts; one real violation is >= 1 / (N * Q * EPISODES) = 0.0056.
  checks = {k: v["mean"] for k, v in results.items() if k.startswith("violation:")}
  assert checks and all(v < 1e-6 for v in checks.values()), checks


def test_query_attack_is_below_clean_monotone_in_steps_and_zero_at_full_radius(trained):
  epsilons = (0.01, 0.05, 0.2, 1.0)
  # Same epsilons, attacks and step size (0.5 * eps): PGD-3's iterates are a prefix of PGD-6's.
  make = functools.partial(robust_eval.make_metric_fn, ("pgd", "margin"), epsilons, n_way=N_WAY,
                           relative_step_size=0.5)
  few, many = make(steps=3), make(steps=6)
  key = robust_eval.metric_key
  checks = tuple((f"{p}{key(e)}", f"{p}clean_accuracy") for p in ("few/", "many/") for e in epsilons)
  checks += tuple((f"many/{key(e)}", f"few/{key(e)}") for e in epsilons)
  results = evaluate(trained, functools.partial(with_checks, fns=(("few/", few), ("many/", many)),
                                                checks=checks))
  assert_no_violations(results)
  clean = results["few/clean_accuracy"]["mean"]
  assert clean > 0.6  # chance is 0.2
  assert results["many/clean_accuracy"]["mean"] == clean
  for p in ("few/", "many/"):
    assert results[p + key(1.0)]["mean"] == 0.0  # any image can become any other
    assert results[p + key(0.2)]["mean"] < clean  # the attack does something
    assert results[p + key(0.2)]["n"] == EPISODES
  assert set(results) >= {"few/robust_accuracy@0.01", "many/robust_accuracy@0.05"}


def test_support_poisoning_and_both_are_bounded_by_their_components(trained):
  """Support poisoning hurts: the attacker differentiates through the inner loop. A
  FOMAML run's train-phase adapt() hides d(adapted)/d(support), so evaluation takes the
  test phase, which is second order for every MAML variant (learners.maml.from_config;
  tests/test_learner_protocol.py). No random start, so any change to the support set
  comes from that gradient."""
  learner, meta, pool = trained
  train_phase = Learner(mlp_apply, inner_steps=1, inner_lr=0.4, first_order=True)
  fomaml = (dataclasses.replace(train_phase, first_order=False), meta, pool)
  eps = 0.2
  cfg = dataclasses.replace(robust_eval.attack_config("pgd", eps, n_way=N_WAY, steps=4),
                            random_start=False)
  make = lambda target: functools.partial(robust_eval.robust_metrics,
                                          attack_sets=((cfg,),), target=target)
  rob, q, s = (robust_eval.metric_key(eps, p) for p in
               ("robust_accuracy", "query_robust_accuracy", "support_robust_accuracy"))
  checks = (("support/" + rob, "support/clean_accuracy"), ("both/" + rob, "both/clean_accuracy"),
            ("both/" + rob, "both/" + q), ("both/" + rob, "both/" + s),
            ("both/" + q, "both/clean_accuracy"), ("both/" + s, "both/clean_accuracy"))
  fns = (("support/", make("support")), ("both/", make("both")))
  results = evaluate(fomaml, functools.partial(with_checks, fns=fns, checks=checks))
  assert_no_violations(results)
  clean = results["support/clean_accuracy"]["mean"]
  assert clean > 0.6
  assert results["support/" + rob]["mean"] < clean - 0.05
  assert results["both/" + s]["mean"] < clean - 0.05
  assert results["both/" + q]["mean"] < clean


def test_per_example_attacks_only_lower_robust_accuracy(trained):
  """With aimed attacks: robust <= summed <= clean in every episode, for the
  query and the both threat models; the summed number is exactly the one
  written without them (same keys); at epsilon 1 both reach 0."""
  epsilons = (0.05, 1.0)
  make = functools.partial(robust_eval.make_metric_fn, ("pgd",), epsilons, n_way=N_WAY,
                           steps=3)
  key, summed = robust_eval.metric_key, functools.partial(robust_eval.metric_key,
                                                          prefix="summed_robust_accuracy")
  fns = (("plain/", make()), ("aimed/", make(per_example=("apgd",), per_example_chunk=2)),
         ("both/", make(target="both", per_example=("margin",))))
  checks = tuple((f"{p}{key(e)}", f"{p}{summed(e)}") for p in ("aimed/", "both/") for e in epsilons)
  checks += tuple((f"{p}{summed(e)}", f"{p}clean_accuracy") for p in ("aimed/", "both/")
                  for e in epsilons)
  results = evaluate(trained, functools.partial(with_checks, fns=fns, checks=checks),
                     num_episodes=8)
  assert_no_violations(results)
  assert "plain/" + summed(0.05) not in results
  for e in epsilons:
    assert results["aimed/" + summed(e)] == results["plain/" + key(e)]
  assert results["aimed/" + key(0.05)]["mean"] < results["aimed/" + summed(0.05)]["mean"]
  for p in ("aimed/", "both/"):
    assert results[p + key(1.0)]["mean"] == results[p + summed(1.0)]["mean"] == 0.0
  with pytest.raises(ValueError, match="query"):
    robust_eval.make_metric_fn(("pgd",), (0.1,), n_way=5, target="support",
                               per_example=("margin",))


def test_alone_threat_model_in_the_evaluation(trained):
  """--attack_alone: each query attacked with the others clean; alone <= clean per episode,
  the joint numbers unchanged by it, 0 at epsilon 1 (the mlp's batch norm couples the
  queries, so alone and joint differ in general); refused for support attacks."""
  epsilons = (0.1, 1.0)
  make = functools.partial(robust_eval.make_metric_fn, ("pgd", "margin"), epsilons,
                           n_way=N_WAY, steps=3)
  alone = functools.partial(robust_eval.metric_key, prefix="alone_robust_accuracy")
  fns = (("joint/", make()), ("alone/", make(alone=True)))
  checks = tuple((f"alone/{alone(e)}", "alone/clean_accuracy") for e in epsilons)
  results = evaluate(trained, functools.partial(with_checks, fns=fns, checks=checks),
                     num_episodes=8)
  assert_no_violations(results)
  for e in epsilons:
    key = robust_eval.metric_key(e)
    assert results["alone/" + key] == results["joint/" + key]
  assert results["alone/" + alone(1.0)]["mean"] == 0.0
  assert results["alone/" + alone(0.1)]["mean"] < results["alone/clean_accuracy"]["mean"]
  with pytest.raises(ValueError, match="one query"):
    robust_eval.make_metric_fn(("pgd",), (0.1,), n_way=5, target="both", alone=True)


def test_autoattack_metrics_fall_over_its_parts(trained):
  """On the batch-norm MLP: AutoAttack's robust accuracy after each part never
  rises, ends at robust_accuracy (no other attack listed), stays below clean,
  and is 0 at epsilon 1."""
  epsilons = (0.1, 1.0)
  fn = robust_eval.make_metric_fn(("autoattack",), epsilons, n_way=N_WAY,
                                  steps=2, square_queries=10)
  after = lambda part, e: robust_eval.metric_key(e, f"autoattack_{part}_robust_accuracy")
  parts = robust_eval.AUTOATTACK_PARTS
  checks = tuple((after(b, e), after(a, e)) for e in epsilons for a, b in zip(parts, parts[1:]))
  checks += tuple((after(parts[0], e), "clean_accuracy") for e in epsilons)
  results = evaluate(trained, functools.partial(with_checks, fns=(("", fn),), checks=checks),
                     num_episodes=4)
  assert_no_violations(results)
  for e in epsilons:
    assert results[after(parts[-1], e)] == results[robust_eval.metric_key(e)]
  assert results[robust_eval.metric_key(1.0)]["mean"] == 0.0
  assert results[robust_eval.metric_key(0.1)]["mean"] < results["clean_accuracy"]["mean"]
  with pytest.raises(ValueError, match="query"):
    robust_eval.make_metric_fn(("autoattack",), (0.1,), n_way=5, target="both")


def test_attack_presets_and_flag_errors():
  from absl import app, flags
  from absl.testing import flagsaver
  from experiments import attack_flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(epsilons="0.1"):
    s = attack_flags.attack_settings_from_flags()
    assert (s.names, s.steps, s.restarts, s.per_example) == (
        ("pgd", "margin", "apgd"), 20, 1, ("margin", "apgd"))
  with flagsaver.flagsaver(attack_preset="strong", epsilons="0.1", attack_steps=7):
    s = attack_flags.attack_settings_from_flags()  # a given flag beats the preset
    assert (s.names, s.steps, s.restarts) == (("pgd", "margin", "apgd"), 7, 5)
  with flagsaver.flagsaver(attack_preset="autoattack", epsilons="0.1", square_queries=300):
    s = attack_flags.attack_settings_from_flags()
    assert (s.names, s.steps, s.restarts, s.square_queries) == (("autoattack",), 100, 1, 300)
    record = attack_flags.attack_record(s, n_way=5)
    assert record["configs"]["robust_accuracy@0.1"][0]["targets"] == 4  # N - 1 in 5-way
  with flagsaver.flagsaver(attack_target="support", epsilons="0.1"):
    assert attack_flags.attack_settings_from_flags().per_example == ()  # nothing to aim at
  bad = [dict(attack_preset="huge"), dict(attacks="autoattack", norm="l1"),
         dict(attacks="autoattack", attack_target="both"), dict(square_queries=0),
         dict(per_example_chunk=-1), dict(per_example_attacks="cw"),
         dict(per_example_attacks="margin,autoattack"),
         dict(per_example=True, attack_target="support")]
  for overrides in bad:
    with flagsaver.flagsaver(epsilons="0.1", **overrides):
      with pytest.raises(app.UsageError) as err:
        attack_flags.attack_settings_from_flags()
      assert any(f"--{k}" in str(err.value) for k in overrides), (overrides, str(err.value))


def test_deterministic_and_independent_of_batching(trained):
  make = functools.partial(robust_eval.make_metric_fn, ("pgd",), (0.1,), n_way=N_WAY,
                           steps=3)
  fn = make()
  assert make() is fn and hash(fn) == hash(make())  # cached: one compile per setting
  a = evaluate(trained, fn, batch_tasks=2, num_episodes=6)
  assert evaluate(trained, fn, batch_tasks=2, num_episodes=6) == a
  b = evaluate(trained, fn, batch_tasks=3, num_episodes=6)
  assert a == b
  assert a["robust_accuracy@0.1"]["mean"] <= a["clean_accuracy"]["mean"]


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match="attack"):
    robust_eval.attack_config("cw", 0.1, n_way=5)
  with pytest.raises(ValueError, match="target"):
    robust_eval.make_metric_fn(("pgd",), (0.1,), n_way=5, target="weights")
  assert robust_eval.attack_config("apgd", 0.1, n_way=2).loss == "ce"    # DLR needs 3 classes
  assert robust_eval.attack_config("apgd", 0.1, n_way=5).loss == "dlr"
  assert robust_eval.attack_config("margin", 0.1, n_way=5, relative_step_size=0.5).step_size == 0.05
  assert robust_eval.metric_key(0.1) == "robust_accuracy@0.1"
  assert robust_eval.metric_key(1) == "robust_accuracy@1.0"


def _assert_png(path):
  path = pathlib.Path(path)
  assert path.is_file() and path.stat().st_size > 0
  with Image.open(path) as im:
    im.verify()
    assert im.format == "PNG"
  assert not list(path.parent.glob(f".{path.name}.tmp-*"))  # atomic: no temp file left


def test_plots_write_valid_pngs(tmp_path):
  metrics = {"clean_accuracy": {"mean": 0.9, "ci95": 0.02, "std": 0.1, "n": 50},
             "robust_accuracy@0.05": {"mean": 0.6, "ci95": 0.05, "std": 0.2, "n": 50},
             "robust_accuracy@0.1": {"mean": 0.2, "ci95": float("nan"), "std": 0.0, "n": 1},
             "query_robust_accuracy@0.1": {"mean": 0.5, "ci95": 0.05, "std": 0.2, "n": 50}}
  eps, mean, ci = plots.robustness_points(metrics)
  np.testing.assert_allclose(eps, [0.0, 0.05, 0.1])
  np.testing.assert_allclose(mean, [0.9, 0.6, 0.2])
  np.testing.assert_allclose(ci, [0.02, 0.05, 0.0])
  _assert_png(plots.plot_robustness_curve({"metrics": metrics}, tmp_path / "a" / "curve.png"))
  _assert_png(plots.plot_robustness_curve({"natural": metrics, "adversarial": {"metrics": metrics}},
                                          tmp_path / "two.png", norm="linf", title="t"))
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(6, 8, 8, 1)).astype(np.float32)
  y = np.arange(6) % 3
  _assert_png(plots.plot_adversarial_grid(x, np.clip(x + 0.1, 0, 1), y, y, (y + 1) % 3,
                                          tmp_path / "grid.png", max_images=4))
  with pytest.raises(ValueError, match="shapes"):
    plots.plot_adversarial_grid(x, x[:2], y, y, y, tmp_path / "bad.png")


def test_evaluate_entry_point_with_attacks(tiny_run):
  work, env = tiny_run
  out = _run("experiments.evaluate", f"--workdir={work}", "--episodes=4", "--epsilons=0.05,1.0",
             "--attacks=pgd,apgd", "--attack_steps=5", "--per_example_attacks=margin", env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  record = json.loads((work / "eval_test.json").read_text())
  m = record["metrics"]
  clean, low, full = (m[k]["mean"] for k in ("clean_accuracy", "robust_accuracy@0.05",
                                              "robust_accuracy@1.0"))
  assert m["clean_accuracy"]["n"] == 4 and set(m["clean_accuracy"]) == {"mean", "ci95", "std", "n"}
  assert 0.0 <= full <= low <= clean <= 1.0 and full == 0.0
  # Aimed attacks are on by default (here one, to keep the compile short); the
  # summed-loss number is written beside.
  summed_low = m["summed_robust_accuracy@0.05"]["mean"]
  assert low <= summed_low <= clean and m["summed_robust_accuracy@1.0"]["mean"] == 0.0
  attack = record["attack"]
  assert attack["per_example"] == ["margin"]
  assert [c["loss"] for c in attack["per_example_configs"]["robust_accuracy@0.05"]] == ["margin"]
  assert attack["attacks"] == ["pgd", "apgd"] and attack["epsilons"] == [0.05, 1.0]
  assert attack["norm"] == "linf" and attack["steps"] == 5 and attack["target"] == "query"
  assert [c["name"] for c in attack["configs"]["robust_accuracy@1.0"]] == ["pgd", "apgd"]
  assert attack["configs"]["robust_accuracy@1.0"][1]["loss"] == "dlr"  # tiny preset is 3-way
  for name in ("robustness_test.png", "adversarial_examples_test.png"):
    _assert_png(work / name)

  # Bad values are refused before anything is loaded, naming the flag.
  for flag in ("--epsilons=0.1,-1", "--attack_target=weights", "--attacks=pgd,cw",
               "--per_example_attacks=cw", "--per_example_chunk=-1"):
    out = _run("experiments.evaluate", f"--workdir={work}", flag, env=env)
    assert out.returncode != 0 and flag.split("=")[0] in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("num_curves, beside", [(2, False), (13, True)])
def test_a_table_of_curves_gets_its_legend_beside_the_axes_in_distinct_colours(
    tmp_path, monkeypatch, num_curves, beside):
  """Many runs (a README table's figure): the legend leaves the axes, each line its own colour."""
  metrics = {"clean_accuracy": {"mean": 0.9, "ci95": 0.02, "std": 0.1, "n": 50},
             "robust_accuracy@0.1": {"mean": 0.2, "ci95": 0.05, "std": 0.2, "n": 50}}
  figures = []
  save = plots._save
  monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or save(fig, path))
  curves = {f"run {i}": metrics for i in range(num_curves)}
  for draw in (lambda p: plots.plot_robustness_curve(curves, p),
               lambda p: plots.plot_validation_curves(
                   {name: [(0, 0.5, 0.1), (10, 0.9, 0.05)] for name in curves}, p)):
    _assert_png(draw(tmp_path / f"{len(figures)}.png"))
    ax = figures[-1].axes[0]
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == list(curves)
    renderer = figures[-1].canvas.get_renderer()
    assert (legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1) == beside
    lines = [c[0] for c in ax.containers] or [   # errorbar's data lines, or plot's
        line for line in ax.get_lines() if not line.get_label().startswith("_")]
    colours = {matplotlib.colors.to_rgba(line.get_color()) for line in lines}
    assert len(colours) == num_curves
