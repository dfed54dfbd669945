"""Figures of robust evaluation results and training curves, as PNG files (matplotlib, Agg, no display).

Figures are built on a bare ``Figure`` with an Agg canvas rather than pyplot,
so no global state or GUI backend is touched, and written atomically (temp
file + ``os.replace``) so a reader never sees half a PNG.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Mapping

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

def by_epsilon(metrics: Mapping, metric: str = "robust_accuracy") -> dict:
  """{eps: stats} of the ``<metric>@<eps>`` entries of an evaluation's metrics, by epsilon
  (the names ``robust_eval.metric_key`` writes)."""
  pattern = re.compile(rf"^{re.escape(metric)}@(.+)$")
  return dict(sorted((float(m.group(1)), stats) for name, stats in metrics.items()
                     if (m := pattern.match(name))))


# Up to this many lines the legend sits inside the axes; more (a table's worth of
# runs) go beside it, on a wider figure, in 20 distinct colours instead of 10.
_LEGEND_INSIDE = 6


def _axes(num_lines: int):
  """(figure, axes) for ``num_lines`` labelled lines."""
  fig = Figure(figsize=(5.0 + (3.2 if num_lines > _LEGEND_INSIDE else 0.0), 3.6))
  ax = fig.add_subplot(1, 1, 1)
  if num_lines > 10:
    ax.set_prop_cycle(color=[matplotlib.colormaps["tab20"](i) for i in range(20)])
  return fig, ax


def _legend(ax, num_lines: int) -> None:
  if num_lines > _LEGEND_INSIDE:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", borderaxespad=0.0)
  else:
    ax.legend()


def _save(fig: Figure, path: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    FigureCanvasAgg(fig)
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
  return path


def _is_metrics(d: Mapping) -> bool:
  return "clean_accuracy" in d or bool(by_epsilon(d))


def _curves(results: Mapping) -> dict[str, dict]:
  """{label: metrics} from an evaluation record, a metrics dict, or {label: either}."""
  if "metrics" in results:
    return {"": results["metrics"]}
  if _is_metrics(results):
    return {"": results}
  out = {}
  for label, value in results.items():
    metrics = value.get("metrics", value)
    if not _is_metrics(metrics):
      raise ValueError(f"results[{label!r}] holds no clean_accuracy or robust_accuracy@eps entries")
    out[str(label)] = metrics
  return out


def robustness_points(metrics: Mapping) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(epsilons, means, ci95) sorted by epsilon, each (P,); clean accuracy is the
  point at epsilon 0 unless a robust_accuracy@0.0 entry is given."""
  points = by_epsilon(metrics)
  if "clean_accuracy" in metrics and 0.0 not in points:
    points[0.0] = metrics["clean_accuracy"]
  eps = np.array(sorted(points), np.float64)
  mean = np.array([points[e]["mean"] for e in eps], np.float64)
  ci = np.array([points[e].get("ci95", 0.0) for e in eps], np.float64)
  return eps, mean, np.where(np.isfinite(ci), ci, 0.0)  # n=1 has a NaN interval


def plot_robustness_curve(results: Mapping, path: str | os.PathLike, *, title: str | None = None,
                          norm: str | None = None) -> pathlib.Path:
  """Robust accuracy (95% CI error bars) against epsilon; returns the PNG path.

  results: an evaluation record (with "metrics"), its metrics dict
  {"clean_accuracy": {"mean", "ci95", ...}, "robust_accuracy@<eps>": {...}},
  or {label: record or metrics} for several curves on one plot.
  """
  curves = _curves(results)
  fig, ax = _axes(len(curves))
  for label, metrics in curves.items():
    eps, mean, ci = robustness_points(metrics)
    if eps.size == 0:
      raise ValueError("no clean_accuracy or robust_accuracy@eps entries to plot")
    ax.errorbar(eps, 100 * mean, yerr=100 * ci, marker="o", capsize=3, label=label or None)
  ax.set_xlabel(f"epsilon ({norm})" if norm else "epsilon")
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(-2, 102)
  ax.grid(True, alpha=0.3)
  if title:
    ax.set_title(title)
  if any(curves):
    _legend(ax, len(curves))
  fig.tight_layout()
  return _save(fig, path)


def plot_validation_curves(curves: Mapping[str, list], path: str | os.PathLike, *,
                           title: str | None = None) -> pathlib.Path:
  """Validation accuracy against meta-steps, one line per run (95% CI band); returns the PNG path.

  curves: {label: [(step, accuracy, ci95), ...]}, accuracy in [0, 1].
  """
  fig, ax = _axes(len(curves))
  for label, points in curves.items():
    steps, mean, ci = (np.array(c, np.float64) for c in zip(*sorted(points)))
    ci = np.where(np.isfinite(ci), ci, 0.0)   # n=1 has a NaN interval
    (line,) = ax.plot(steps, 100 * mean, marker=".", label=label)
    ax.fill_between(steps, 100 * (mean - ci), 100 * (mean + ci), color=line.get_color(), alpha=0.2)
  ax.set_xlabel("meta-steps")
  ax.set_ylabel("validation accuracy (%)")
  ax.grid(True, alpha=0.3)
  if title:
    ax.set_title(title)
  _legend(ax, len(curves))
  fig.tight_layout()
  return _save(fig, path)


def _as_images(x) -> np.ndarray:
  """(B, H, W[, C]) -> (B, H, W) grey or (B, H, W, 3) colour, float in [0, 1]."""
  x = np.asarray(x, np.float32)
  if x.ndim == 4 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim not in (3, 4):
    raise ValueError(f"images must be (B, H, W) or (B, H, W, C), got shape {x.shape}")
  return np.clip(x, 0.0, 1.0)


def plot_adversarial_grid(clean_x, adv_x, y, clean_pred, adv_pred, path: str | os.PathLike, *,
                          max_images: int = 10, title: str | None = None) -> pathlib.Path:
  """Two rows, clean images above their adversarial versions, labelled
  "pred p / true t" with wrong predictions in red; returns the PNG path.

  clean_x, adv_x: (B, H, W[, C]) in [0, 1]; y, clean_pred, adv_pred: (B,) ints.
  Shows the first ``max_images`` examples.
  """
  clean_x, adv_x = _as_images(clean_x), _as_images(adv_x)
  y, clean_pred, adv_pred = (np.asarray(a).reshape(-1) for a in (y, clean_pred, adv_pred))
  b = clean_x.shape[0]
  if adv_x.shape != clean_x.shape or not (y.size == clean_pred.size == adv_pred.size == b):
    raise ValueError(f"inconsistent shapes: clean {clean_x.shape}, adversarial {adv_x.shape}, "
                     f"labels {y.shape}, predictions {clean_pred.shape} and {adv_pred.shape}")
  n = max(1, min(b, max_images))
  fig = Figure(figsize=(1.3 * n + 0.8, 3.8))
  for row, (name, images, preds) in enumerate((("clean", clean_x, clean_pred),
                                                ("adversarial", adv_x, adv_pred))):
    for j in range(n):
      ax = fig.add_subplot(2, n, row * n + j + 1)
      ax.set_xticks([])
      ax.set_yticks([])
      if j >= b:
        continue
      ax.imshow(images[j], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
      wrong = preds[j] != y[j]
      ax.set_title(f"pred {preds[j]} / true {y[j]}", fontsize=7, color="red" if wrong else "black")
      if j == 0:
        ax.set_ylabel(name, fontsize=8)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


__all__ = ["plot_robustness_curve", "plot_adversarial_grid", "plot_validation_curves",
           "robustness_points"]
