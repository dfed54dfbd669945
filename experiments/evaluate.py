r"""Evaluate a trained few-shot learner on test episodes, clean or under attack.

  python -m experiments.evaluate --workdir=runs/maml_5w1s [--episodes=600 --seed=0]
  python -m experiments.evaluate --workdir=runs/maml_5w1s --epsilons=0.025,0.05,0.1 \
      --attacks=pgd,margin,apgd --norm=linf --attack_steps=20 --attack_target=query
  python -m experiments.evaluate --workdir=runs/maml_5w1s --epsilons=0.05,0.1 \
      --attack_preset=autoattack

Writes <workdir>/eval_<split>.json (or --output) with the mean accuracy and its
95% confidence interval. With --epsilons, the metrics are clean_accuracy and
robust_accuracy@<eps> (per-example worst case over --attacks and, unless
--noper_example, the --per_example_attacks aimed at each query example;
summed_robust_accuracy@<eps> is then the number of --attacks alone; with
--attacks=autoattack also autoattack_<part>_robust_accuracy@<eps>, AutoAttack's
robust accuracy after each of its parts), the attack
settings are recorded under "attack", and (unless --noplot)
<workdir>/robustness_<split>.png and <workdir>/adversarial_examples_<split>.png
are written.

Given a training workdir, the metrics' means are also written as TensorBoard
scalars at the checkpoint's step (test/accuracy, test/robust_accuracy@<eps>,
...; eval_val/... and eval_train/... on those splits) in
<workdir>/tensorboard/evaluation/; --notensorboard turns it off.

An interrupted evaluation resumes: after every batch of episodes the
per-episode results are kept in <output stem>.partial.npz beside the output,
and a later run with the same attack and masking flags, checkpoint, data,
split, seed, inner steps and code starts after them (otherwise it starts
over); the file is deleted once the JSON is written.
--noresume neither reads nor keeps it.

Gradient-masking checks (experiments/masking_flags.py, advmaml/eval/masking.py),
each off unless its flag is given, add their numbers to "metrics"
(masking/...) and their verdicts under "masking_checks"; a failed check is
logged as a warning naming it:

  python -m experiments.evaluate --workdir=runs/aq_5w1s --epsilons=0.05,0.1 \
      --check_transfer_from=runs/aq_5w1s_seed1 --check_black_box \
      --check_large_epsilon=0.5 --check_loss_progress
"""

# First, before anything imports JAX: the host device count is fixed when JAX starts.
from advmaml.runtime import host
HOST_DEVICES = host.use_all_cpu_cores()

import json
import pathlib

import jax
from absl import app, flags, logging

from advmaml.eval import masking, plots, robust_eval
from advmaml.eval.evaluation import evaluation_episode
from advmaml.io import partial_results
from advmaml.io.tensorboard_scalars import evaluation_prefix
from advmaml.eval.trained_runs import (config_identity, evaluate_trained, load_trained,
                                       test_learner, write_json)
from experiments.attack_flags import (AttackSettings, attack_record, attack_settings_from_flags,
                                      metric_fn_from_settings)
import experiments
from experiments import attack_flags, cli, masking_flags, run_flags, tensorboard_flag
from experiments.run_flags import (DATA_DIR, EPISODES, INNER_STEPS, NUM_DEVICES, SEED, SPLIT,
                                   WORKDIR)

OUTPUT = flags.DEFINE_string("output", None, "JSON output path (default <workdir>/eval_<split>.json).")
RESUME = flags.DEFINE_bool(
    "resume", True, "Keep finished episodes in <output stem>.partial.npz and go on from that "
    "file if an interrupted run of the same evaluation left it.")
# Flags that change what is drawn or plotted, not the per-episode numbers; and the
# surrogate's path, which says where it lies: its parameters are in the digest of
# the evaluated parameters and its config is added below.
_NOT_IN_IDENTITY = ("plot", "per_example_chunk", "check_transfer_from")


def _settings_identity(checks) -> str:
  """The attack and masking flags, the transfer surrogate's config and the code that
  reads them, which (with what evaluate_trained adds) decide the results."""
  by_module = flags.FLAGS.flags_by_module_dict()
  values = {f.name: f.value for module in (attack_flags, masking_flags)
            for f in by_module.get(module.__name__, ()) if f.name not in _NOT_IN_IDENTITY}
  surrogate = None if checks is None else checks.surrogate
  values["surrogate config"] = None if surrogate is None else config_identity(surrogate.cfg)
  values["experiments code"] = partial_results.source_digest(experiments)
  return json.dumps(values, sort_keys=True, default=str)


def _write_plots(run, splits, record, settings: AttackSettings, folder: pathlib.Path) -> list[str]:
  """The robustness curve and the attacked images of the first evaluation episode."""
  cfg, split = run.cfg, record["split"]
  curve = plots.plot_robustness_curve(
      record, folder / f"robustness_{split}.png", norm=settings.norm,
      title=f"{split}: {'+'.join(settings.names)}, target {settings.target}, step {run.step}")
  # The middle epsilon: the largest ones often give unreadable images.
  eps = sorted(settings.epsilons)[(len(settings.epsilons) - 1) // 2]
  cfgs = robust_eval.attack_sets(settings.names, (eps,), n_way=cfg.n_way, norm=settings.norm,
                                 steps=settings.steps, restarts=settings.restarts,
                                 square_queries=settings.square_queries)[0]
  # Episode 0 of the evaluation, with its metric key, as evaluate_episodes draws it.
  episode, metric_key = evaluation_episode(jax.numpy.asarray(splits[split].images),
                                           jax.random.key(record["seed"]), 0, cfg.n_way,
                                           cfg.k_shot, cfg.eval_q_query)
  ex = jax.device_get(robust_eval.adversarial_examples(
      test_learner(cfg, inner_steps=record["inner_steps"]), run.meta_params, episode, metric_key,
      cfgs=cfgs, target=settings.target))
  grid = plots.plot_adversarial_grid(
      ex["clean_x"], ex["adv_x"], ex["y"], ex["clean_pred"], ex["adv_pred"],
      folder / f"adversarial_examples_{split}.png",
      title=f"{settings.target} attack, {settings.norm} epsilon {eps:g}")
  record["attack"]["examples_epsilon"] = eps
  return [str(curve), str(grid)]


def _write_scalars(record: dict) -> None:
  """The metrics' means as TensorBoard scalars: test/accuracy, test/robust_accuracy@0.1, ..."""
  tensorboard_flag.write_evaluation_scalars(
      WORKDIR.value, record["step"], evaluation_prefix(record["split"]),
      {name: stats["mean"] for name, stats in record["metrics"].items()})


def _finish(partial: pathlib.Path | None) -> None:
  """The results are in the JSON: the episodes kept for a resume are not needed."""
  if partial is not None:
    partial_results.remove(partial)


def _main():
  logging.info(HOST_DEVICES)
  run_flags.check_run_flags()
  settings = attack_settings_from_flags()  # before loading anything: fail fast
  masking_flags.check_flags(settings)
  run, splits = load_trained(WORKDIR.value, DATA_DIR.value,
                             trust_unverified=cli.TRUST_UNVERIFIED.value)
  metric_fn = metric_fn_from_settings(settings, run.cfg.n_way)
  checks = masking_flags.masking_settings_from_flags(settings, run,
                                                     trust_unverified=cli.TRUST_UNVERIFIED.value)
  metric_params = None
  if checks is not None:
    metric_fn = masking.with_masking_metrics(metric_fn, checks.checks)
    metric_params = checks.metric_params(run)
  output = cli.output_path(WORKDIR.value, OUTPUT.value, f"eval_{SPLIT.value}.json")
  partial = output.with_suffix(".partial.npz") if RESUME.value else None
  if partial is not None:
    partial.parent.mkdir(parents=True, exist_ok=True)
  record = evaluate_trained(run, splits, split=SPLIT.value, num_episodes=EPISODES.value,
                            seed=SEED.value, inner_steps=INNER_STEPS.value, metric_fn=metric_fn,
                            num_devices=NUM_DEVICES.value, metric_params=metric_params,
                            partial_path=partial,
                            settings=_settings_identity(checks) if partial is not None else "")
  folder = cli.run_folder(WORKDIR.value)
  if not settings.epsilons:
    write_json(output, record)
    _finish(partial)
    _write_scalars(record)
    acc = record["metrics"]["accuracy"]
    logging.info("%s accuracy over %d episodes: %.2f%% +- %.2f%% (95%% CI); written to %s",
                 SPLIT.value, record["num_episodes"], 100 * acc["mean"], 100 * acc["ci95"], output)
    return
  record["attack"] = attack_record(settings, run.cfg.n_way)
  if checks is not None:
    masking_flags.report(record, checks)
  if settings.plot:
    record["plots"] = _write_plots(run, splits, record, settings, folder)
  write_json(output, record)
  _finish(partial)
  _write_scalars(record)
  clean = record["metrics"]["clean_accuracy"]
  logging.info("%s clean accuracy over %d episodes: %.2f%% +- %.2f%% (95%% CI)",
               SPLIT.value, record["num_episodes"], 100 * clean["mean"], 100 * clean["ci95"])
  for eps in settings.epsilons:
    rob = record["metrics"][robust_eval.metric_key(eps)]
    logging.info("  %s robust accuracy at %s epsilon %g: %.2f%% +- %.2f%%", settings.target,
                 settings.norm, eps, 100 * rob["mean"], 100 * rob["ci95"])
    summed = record["metrics"].get(robust_eval.metric_key(eps, "summed_robust_accuracy"))
    if summed is not None:
      logging.info("    (summed-loss attacks alone: %.2f%% +- %.2f%%)", 100 * summed["mean"],
                   100 * summed["ci95"])
    for part in robust_eval.AUTOATTACK_PARTS:
      after = record["metrics"].get(robust_eval.metric_key(eps, f"autoattack_{part}_robust_accuracy"))
      if after is not None:
        logging.info("    AutoAttack after %s: %.2f%%", part, 100 * after["mean"])
  logging.info("written to %s", output)


main = cli.entry_point(_main)

if __name__ == "__main__":
  app.run(main)
