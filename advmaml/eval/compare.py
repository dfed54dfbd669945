"""Comparing trained runs from their workdirs' kept JSON files: one table, two figures.

Reads, from each workdir:

* ``config.json``: the model, the objective and the task (``n_way``-way
  ``k_shot``-shot; a column of the table only where the runs' tasks differ);
* ``metrics.jsonl``: the validation curve and the wall time (below);
* ``eval_test*.json`` (``experiments.evaluate``'s records): the clean accuracy
  (``clean_accuracy``, or ``accuracy`` of a clean-only evaluation) and the
  robust accuracy at each epsilon (``robust_accuracy@<eps>``), with their 95%
  intervals. The records of the newest evaluated checkpoint are merged, in
  file-name order; a metric two of them hold is taken from the first.

Wall time: the sum, over the training records of ``metrics.jsonl`` up to the
evaluated step, of the steps since the previous record divided by the
record's ``steps_per_sec``. That is the time the kept steps took, validation
and checkpoints included (they fall inside a logging window), start-up
excluded, and a killed run's steps after its last checkpoint counted once
(a resume truncates them from the log); it needs no ``train.log``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

from advmaml.eval import plots
from advmaml.io.workdir import METRICS_FILE, read_metrics


class CompareError(ValueError):
  """A workdir that cannot be compared; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class RunSummary:
  label: str                 # the workdir's name
  task: str                  # "5-way 1-shot": the config's n_way and k_shot
  model: str
  objective: str
  learner: str               # the config's learner ("maml" when it names none)
  steps: int                 # the evaluated checkpoint's step (else the last logged step)
  wall_seconds: float
  clean: dict | None         # {"mean", "ci95", ...} or None without an evaluation
  robust: dict               # epsilon -> {"mean", "ci95", ...}
  norm: str | None           # the attacks' threat model
  val_curve: list            # [(step, accuracy, ci95)]
  columns: dict = dataclasses.field(default_factory=dict)  # Column.label -> {eps: stats} or str


@dataclasses.dataclass(frozen=True)
class Column:
  """Extra table columns: ``metric@eps`` of the record in ``file``, one column per epsilon.

  ``metric="masking_checks"`` gives one column instead: how many of the record's
  gradient-masking checks passed. Written ``LABEL=FILE:METRIC`` on the command line.
  """
  label: str
  file: str
  metric: str

  @classmethod
  def parse(cls, spec: str) -> "Column":
    label, sep, rest = spec.partition("=")
    file, sep2, metric = rest.rpartition(":")
    if not (sep and sep2 and label and file and metric):
      raise CompareError(f"--column={spec!r}: write LABEL=FILE:METRIC, e.g. "
                         "'AutoAttack=eval_test_autoattack.json:robust_accuracy'")
    return cls(label, file, metric)


def _column_values(workdir: pathlib.Path, column: Column):
  """{eps: stats} of ``column.metric@eps`` in the workdir's ``column.file`` (or the masking
  checks' "passed/total"); empty (or None) where the file is absent."""
  path = workdir / column.file
  if not path.is_file():
    return None if column.metric == "masking_checks" else {}
  record = read_json(path)
  if column.metric == "masking_checks":
    results = (record.get("masking_checks") or {}).get("results") or []
    return f"{sum(bool(r.get('passed')) for r in results)}/{len(results)} pass" if results else None
  return plots.by_epsilon(record.get("metrics", {}), column.metric)


def read_json(path: pathlib.Path):
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError, UnicodeDecodeError) as e:
    raise CompareError(f"{path}: not readable JSON ({e}); restore it or leave the workdir out") from None


def _merged_evaluations(workdir: pathlib.Path, pattern: str) -> tuple[int | None, dict, str | None]:
  """(step, metrics, norm) of the newest checkpoint evaluated by the files matching ``pattern``."""
  records = [(path, read_json(path)) for path in sorted(workdir.glob(pattern))]
  records = [(p, r) for p, r in records if isinstance(r, dict) and isinstance(r.get("metrics"), dict)]
  if not records:
    return None, {}, None
  step = max(r.get("step", -1) for _, r in records)
  metrics, norm = {}, None
  for _, record in records:
    if record.get("step", -1) != step:
      continue
    for name, stats in record["metrics"].items():
      metrics.setdefault(name, stats)
    norm = norm or record.get("attack", {}).get("norm")
  return step, metrics, norm


def wall_seconds(train_records: list[dict], up_to_step: int) -> float:
  """The module docstring's rule: sum of (steps in the window) / steps_per_sec."""
  total, previous = 0.0, 0
  for record in sorted(train_records, key=lambda r: r["step"]):
    if record["step"] > up_to_step:
      break
    rate = record.get("steps_per_sec")
    if rate and rate > 0:
      total += (record["step"] - previous) / rate
    previous = record["step"]
  return total


def summarize(workdir: str | os.PathLike, eval_pattern: str = "eval_test*.json",
              columns: tuple[Column, ...] = ()) -> RunSummary:
  """One run's row and curves from its workdir's kept files (and its extra ``columns``)."""
  workdir = pathlib.Path(workdir)
  for name in ("config.json", METRICS_FILE):
    if not (workdir / name).is_file():
      raise CompareError(f"{workdir / name} is missing; pass training workdirs (each with "
                         "config.json and metrics.jsonl)")
  config = read_json(workdir / "config.json")
  records = read_metrics(workdir / METRICS_FILE)
  train = [r for r in records if r.get("split") == "train" and "step" in r]
  val = sorted((r["step"], r["accuracy"], r.get("ci95", float("nan")))
               for r in records if r.get("split") == "val" and "accuracy" in r)
  step, metrics, norm = _merged_evaluations(workdir, eval_pattern)
  if step is None:
    step = max((r["step"] for r in train), default=0)
  task = f"{config.get('n_way', '?')}-way {config.get('k_shot', '?')}-shot"
  return RunSummary(label=workdir.resolve().name, task=task, model=config.get("model", "?"),
                    objective=config.get("objective", "?"),
                    learner=config.get("learner", "maml"), steps=int(step),
                    wall_seconds=wall_seconds(train, step),
                    clean=metrics.get("clean_accuracy", metrics.get("accuracy")),
                    robust=plots.by_epsilon(metrics), norm=norm, val_curve=val,
                    columns={c.label: _column_values(workdir, c) for c in columns})


def duration(seconds: float) -> str:
  minutes = int(round(seconds / 60))
  return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def percent(stats: dict | None) -> str:
  if stats is None:
    return "-"
  return f"{100 * stats['mean']:.2f} +- {100 * stats['ci95']:.2f}%"


def _tasks_differ(runs: list[RunSummary]) -> bool:
  """Whether the runs' names need their tasks beside them (one row at two shots)."""
  return len({run.task for run in runs}) > 1


def table(runs: list[RunSummary], *, markdown: bool = False,
          columns: tuple[Column, ...] = ()) -> str:
  """One row per run: (its task, where the runs' tasks differ), model, objective, steps,
  wall time, clean and robust accuracy per epsilon; with ``columns``, those columns
  instead of the robust accuracy's."""
  epsilons = sorted({eps for run in runs for eps in run.robust})
  norms = sorted({run.norm for run in runs if run.norm})
  eps_name = f"{'/'.join(norms)} eps" if norms else "eps"
  with_task = _tasks_differ(runs)
  header = ["run", *(["task"] if with_task else []), "model", "objective", "meta-steps",
            "wall time", "clean"]
  cells = []   # (header, run -> cell)
  if not columns:
    cells = [(f"{eps_name} {eps:g}", lambda run, eps=eps: percent(run.robust.get(eps)))
             for eps in epsilons]
  for column in columns:
    if column.metric == "masking_checks":
      cells.append((column.label, lambda run, c=column: run.columns.get(c.label) or "-"))
      continue
    col_eps = sorted({eps for run in runs for eps in (run.columns.get(column.label) or {})})
    cells += [(f"{column.label} {eps:g}",
               lambda run, c=column, eps=eps: percent((run.columns.get(c.label) or {}).get(eps)))
              for eps in col_eps]
  header += [h for h, _ in cells]
  rows = [[run.label, *([run.task] if with_task else []), run.model, run.objective,
           f"{run.steps:,}", duration(run.wall_seconds), percent(run.clean),
           *(cell(run) for _, cell in cells)] for run in runs]
  if markdown:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
  widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
  return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                   for row in [header, *rows])


def write_figures(runs: list[RunSummary], folder: str | os.PathLike, name: str = "") -> list[pathlib.Path]:
  """robust[_<name>].png (accuracy against epsilon, one line per evaluated run) and
  val[_<name>].png (validation accuracy against meta-steps); returns the paths written."""
  folder, suffix = pathlib.Path(folder), f"_{name}" if name else ""
  written = []
  with_task = _tasks_differ(runs)
  name_of = lambda run: f"{run.label} ({run.task})" if with_task else run.label
  curves = {name_of(run): {"clean_accuracy": run.clean,
                           **{f"robust_accuracy@{eps}": s for eps, s in run.robust.items()}}
            for run in runs if run.clean is not None or run.robust}
  curves = {label: {k: v for k, v in m.items() if v is not None} for label, m in curves.items()}
  if curves:
    norms = sorted({run.norm for run in runs if run.norm})
    written.append(plots.plot_robustness_curve(curves, folder / f"robust{suffix}.png",
                                               norm="/".join(norms) or None,
                                               title="test accuracy under attack"))
  val = {name_of(run): run.val_curve for run in runs if run.val_curve}
  if val:
    written.append(plots.plot_validation_curves(val, folder / f"val{suffix}.png",
                                                title="validation accuracy"))
  return written
