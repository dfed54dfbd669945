"""Experiment configuration: one flat dataclass, named presets, validation.

Every field is settable from the command line as ``--<field>=...`` (see
``experiments/config_flags.py``); a preset fills in the rest. The resolved config is
written to ``<workdir>/config.json`` so that evaluation and resume use exactly
the settings the run was trained with.
"""

from __future__ import annotations

import dataclasses
import json
import importlib
import math
from typing import Any, Callable


class ConfigError(ValueError):
  """A bad setting; the message names the flag and the fix."""


# Where a run's data lives, not what it is: a resume, or an evaluation, on another machine
# or with the folder spelled another way is the same run (the pool digest stands for the data).
LOCATION_FIELDS = ("data_dir", "tfds_data_dir")


@dataclasses.dataclass(frozen=True)
class Config:
  # Data.
  dataset: str = "omniglot"          # see advmaml.data.sources.DATASETS
  data_dir: str | None = None       # else the dataset's variable ($ADVMAML_DATA_DIR for Omniglot), else ~/.cache/advmaml/<dataset>
  tfds_data_dir: str | None = None  # TFDS datasets (*_tfds): prepared data folder, else data_dir
  split: str = "vinyals"            # "vinyals" (MAML paper) or "lake" (background/evaluation alphabets)
  split_seed: int = 0
  rotate: bool = True               # 90-degree rotations as extra classes
  image_size: int = 28
  # Episodes.
  n_way: int = 5
  k_shot: int = 1
  q_query: int = 1                  # query examples per class during meta-training (MAML: K)
  train_k_shot: int = 0             # support examples per class during meta-training (0: k_shot; MetaOptNet and the AQ code train metric heads with more)
  eval_q_query: int = 1             # query examples per class at evaluation
  # Network.
  model: str = "conv4"              # a backbone of advmaml.models.names(): "conv4" (MAML's Omniglot net), "conv4_maxpool", "resnet12"
  filters: int = 64                 # the backbone's width (conv4: channels per layer; resnet12: 64 for 64-160-320-640)
  batch_norm: str = "batch"         # "batch": each batch's own statistics (MAML, transductive); "support": the support set's, for the queries too
  kernels: str = "auto"             # "cpu" (fast CPU kernels), "reference" (plain JAX, every transformation), "auto" (cpu on CPU, reference on GPU/TPU)
  conv_impl: str = "im2col"         # the cpu kernels' convolution: "im2col" (fast), "xla" (lax.conv), "taps", "winograd"
  # Learner (advmaml.learners.LEARNERS) and its inner loop.
  learner: str = "maml"             # "maml" (with --first_order: FOMAML, --anil: ANIL, --meta_sgd: Meta-SGD), "protonet", "r2d2", "metaoptnet"
  inner_optimizer: str = "sgd"      # the inner loop's optax update (advmaml.optimizers.INNER_OPTIMIZERS), at inner_lr
  inner_lr: float = 0.4
  inner_steps: int = 1
  eval_inner_steps: int = 10
  first_order: bool = False
  meta_sgd: bool = False
  anil: bool = False
  remat: bool = False               # rematerialise inner steps: less memory, more compute
  # The metric and closed-form heads (learners/protonet.py, r2d2.py, metaoptnet.py).
  head_scale: float = 0.0           # the logits' (initial) scale; 0: the learner's own (protonet 1, r2d2 10, metaoptnet 1)
  protonet_learn_scale: bool = False  # meta-learn ProtoNet's scale (MetaOptNet's ProtoNet head does)
  protonet_normalize: bool = False  # divide ProtoNet's squared distances by the embedding size (MetaOptNet's head)
  r2d2_lambda: float = 1.0          # R2-D2's initial ridge regulariser (meta-learned)
  svm_c: float = 0.1                # MetaOptNet-SVM's cost C
  svm_iterations: int = 50          # MetaOptNet-SVM's ADMM iterations in meta-training
  svm_eval_iterations: int = 100    # ... at validation and evaluation
  transfer_classes: int = 0         # the transfer baseline's classifier width: the meta-train split's class count
  # Outer loop.
  objective: str = "natural"
  meta_batch_size: int = 32
  outer_optimizer: str = "adam"     # the meta-parameters' optax update (advmaml.optimizers.OUTER_OPTIMIZERS), at outer_lr
  outer_lr: float = 1e-3
  num_steps: int = 60000
  seed: int = 0
  num_devices: int = 0              # devices the meta-batch is split over (0: all)
  task_chunk: int = -1              # tasks vmapped together, gradients summed over chunks (0: all; -1: 1 per device on CPU, all on GPU/TPU)
  # Training-time attack of the robust objectives "aq", "adml", "rmaml", "adv_support"
  # (advmaml/robust_objectives.py).
  train_attack: str = "pgd"         # "fgsm", "pgd" or "apgd" (rmaml: fgsm/pgd only)
  train_norm: str = "linf"          # "linf" or "l2"
  train_epsilon: float = 0.1        # radius, in [0, 1] pixel units
  train_attack_steps: int = 7       # PGD-7 as in Madry et al. (2018); FGSM always takes 1
  train_step_size: float | None = None  # None: 2.5 * eps / steps (PGD), eps (FGSM)
  train_random_start: bool = True
  train_attack_best: bool = False   # keep each example's strongest evaluated point, as evaluation does (one more gradient + a clean forward); False: the last iterate (Madry et al.). APGD always keeps the best
  trades_beta: float = 0.0          # aq: + beta * KL(p_clean || p_adv) on the query set (0: off)
  rmaml_beta: float = 5.0           # rmaml: weight of the TRADES KL term (Wang et al. 2021 Omniglot code)
  # Bookkeeping.
  log_every: int = 100
  eval_every: int = 2000            # validation episodes every N steps (0: never)
  val_episodes: int = 200
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  test_episodes: int = 600
  eval_batch_tasks: int = 50        # episodes evaluated per jitted call

  def replace(self, **changes) -> "Config":
    return dataclasses.replace(self, **changes)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, allow_nan=False)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "Config":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
    return cls(**with_legacy_defaults(values))


# Fields added after runs were saved, with the value that reproduces what those
# runs did (their config.json and checkpoints lack the key).
LEGACY_DEFAULTS = {
    # Before 2026-11-29 the training attack kept each example's best point.
    "train_attack_best": True,
    # Before 2026-12-01 batch norm was always transductive and the CPU kernels ran on every backend.
    "batch_norm": "batch",
    "kernels": "cpu",
    # Before the learner protocol (2026-12-01): MAML with plain SGD inside, Adam outside.
    "learner": "maml",
    "inner_optimizer": "sgd",
    "outer_optimizer": "adam",
}


def with_legacy_defaults(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved config dict with the fields it predates filled as the old code behaved,
  and a model name from before the registry (``strided``, ``maxpool``) as it is called now."""
  from advmaml import models  # local: keep config import-light
  saved = {**LEGACY_DEFAULTS, **saved}
  if isinstance(saved.get("model"), str):
    saved["model"] = models.canonical_name(saved["model"], note=False)
  return saved


_OMNIGLOT_5WAY = dict(n_way=5, inner_lr=0.4, inner_steps=1, meta_batch_size=32)
_OMNIGLOT_20WAY = dict(n_way=20, inner_lr=0.1, inner_steps=5, meta_batch_size=16)

# MAML (Finn et al. 2017) Mini-ImageNet: Conv4 with max-pool, 32 filters, inner lr 0.01,
# 5 inner steps (10 at test), meta-batch 4, 15 query images per class; CIFAR-FS and
# FC100 use the same network and settings at 32x32.
_MINI_IMAGENET = dict(dataset="mini_imagenet", split="ravi", rotate=False, image_size=84,
                      model="conv4_maxpool", filters=32, inner_lr=0.01, inner_steps=5,
                      eval_inner_steps=10, meta_batch_size=4, q_query=15, eval_q_query=15)
_CIFAR_FS = dict(_MINI_IMAGENET, dataset="cifar_fs", split="bertinetto", image_size=32)
_FC100 = dict(_MINI_IMAGENET, dataset="fc100", split="oreshkin", image_size=32)

# name -> settings over the Config defaults, and name -> one line for --preset's help.
PRESETS: dict[str, dict[str, Any]] = {}
PRESET_HELP: dict[str, str] = {}


def _preset(name: str, help_line: str, settings: dict[str, Any]) -> None:
  PRESETS[name], PRESET_HELP[name] = settings, help_line


# MAML paper (Finn et al. 2017) Omniglot settings: Adam 1e-3, 10 inner steps at test.
for _ways, _settings in ((5, _OMNIGLOT_5WAY), (20, _OMNIGLOT_20WAY)):
  for _k in (1, 5):   # K query examples per class, as in MAML's code
    _preset(f"omniglot_{_ways}w{_k}s", f"Omniglot {_ways}-way {_k}-shot, MAML's settings",
            dict(_settings, k_shot=_k, q_query=_k, eval_q_query=_k))
for _name, _title, _settings in (
    ("mini_imagenet", "Mini-ImageNet 5-way {}-shot, MAML's settings", _MINI_IMAGENET),
    ("cifar_fs", "CIFAR-FS 5-way {}-shot, MAML's Mini-ImageNet settings", _CIFAR_FS),
    ("fc100", "FC100 5-way {}-shot, MAML's Mini-ImageNet settings", _FC100)):
  for _k in (1, 5):
    _preset(f"{_name}_5w{_k}s", _title.format(_k), dict(_settings, n_way=5, k_shot=_k))
# Adversarial querying as Goldblum, Fowl & Goldstein (2020) ran it, on MetaOptNet's code
# (Lee et al. 2019): ResNet-12, the SVM head, 15 support shots and 6 queries per class in
# meta-training (5 or 1 shot and 15 queries at test), 8 episodes per batch, SGD with
# Nesterov momentum at 0.1, PGD-7 at 8/255 with step 2/255 on the queries; 60 epochs of
# 1,000 batches. Not reproduced: the step-wise learning-rate decay, weight decay 5e-4,
# DropBlock, and the 3 QP iterations (ADMM here). Evaluate with PGD-20 at 8/255
# (docs/training.md#robust-meta-training). Made for a GPU (kernels=auto: reference there).
_AQ_RESNET12 = dict(n_way=5, rotate=False, model="resnet12", filters=64, learner="metaoptnet",
                    objective="aq", train_epsilon=8 / 255, train_attack_steps=7,
                    train_step_size=2 / 255, train_k_shot=15, q_query=6, eval_q_query=15,
                    meta_batch_size=8, outer_optimizer="nesterov", outer_lr=0.1,
                    num_steps=60000, eval_every=1000, val_episodes=200, checkpoint_every=1000)
for _name, _title, _data in (
    ("mini_imagenet", "Mini-ImageNet", dict(dataset="mini_imagenet", split="ravi", image_size=84)),
    ("cifar_fs", "CIFAR-FS", dict(dataset="cifar_fs", split="bertinetto", image_size=32))):
  for _k in (1, 5):
    _preset(f"{_name}_aq_5w{_k}s", f"{_title} 5-way {_k}-shot, AQ on ResNet-12 + SVM",
            dict(_AQ_RESNET12, **_data, k_shot=_k))
_preset("tiny", "3-way, 4 steps: seconds, for tests and smoke runs",
        dict(n_way=3, k_shot=1, q_query=2, eval_q_query=2, filters=8, meta_batch_size=2,
             inner_steps=1, eval_inner_steps=2, num_steps=4, log_every=2, eval_every=0,
             val_episodes=4, checkpoint_every=2, test_episodes=6, eval_batch_tasks=4))

BATCH_NORMS = ("batch", "support")
_TRAIN_ATTACKS = ("fgsm", "pgd", "apgd")
_TRAIN_NORMS = ("linf", "l2")


def _registry(module: str, name: str, transform=tuple) -> Callable[[], tuple[str, ...]]:
  """A function returning ``transform(module.name)``, importing the module only when called."""
  return lambda: tuple(transform(getattr(importlib.import_module(module), name)))


def _all_splits(protocols: dict) -> tuple[str, ...]:
  return tuple(dict.fromkeys(p for names in protocols.values() for p in names))


# Config fields with a fixed set of values: name -> a zero-argument function returning
# them, read when called so that a newly registered objective or model appears by
# itself (the registries import JAX; this module does not). experiments/config_flags.py
# makes each an enum flag; validate() checks each. A new field's choices: one line here.
CHOICES: dict[str, Callable[[], tuple[str, ...]]] = {
    "dataset": _registry("advmaml.data.sources", "DATASETS"),
    "split": _registry("advmaml.data.sources", "PROTOCOLS", _all_splits),
    # The old names stay accepted on the command line: preset() maps them, with a note.
    "model": lambda: (*_registry("advmaml.models", "names", lambda f: f())(),
                      *_registry("advmaml.models", "RENAMED")()),
    "kernels": _registry("advmaml.kernels", "KERNELS"),
    "conv_impl": _registry("advmaml.kernels", "CONV_IMPLS"),
    "batch_norm": lambda: BATCH_NORMS,
    "objective": _registry("advmaml.objectives", "OBJECTIVES", sorted),
    "learner": _registry("advmaml.learners", "LEARNERS"),
    "inner_optimizer": _registry("advmaml.optimizers", "INNER_OPTIMIZERS"),
    "outer_optimizer": _registry("advmaml.optimizers", "OUTER_OPTIMIZERS"),
    "train_attack": lambda: _TRAIN_ATTACKS,
    "train_norm": lambda: _TRAIN_NORMS,
}


def train_attack_config(cfg: Config):
  """The ``attacks.AttackConfig`` of the training-time attack (one restart, CE loss)."""
  from advmaml.adversary import attacks  # local: keep config import-light
  return attacks.AttackConfig(
      name=cfg.train_attack, norm=cfg.train_norm, epsilon=cfg.train_epsilon,
      step_size=cfg.train_step_size, steps=cfg.train_attack_steps, restarts=1,
      random_start=cfg.train_random_start, loss="ce",
      track_best=cfg.train_attack_best or cfg.train_attack == "apgd")


def preset(name: str, **overrides) -> Config:
  """The preset ``name`` with fields replaced; a pre-registry --model name maps to its new one, with a note."""
  from advmaml import models  # local: keep config import-light
  if name not in PRESETS:
    raise ConfigError(f"--preset={name!r} is unknown; choose one of {sorted(PRESETS)}")
  if isinstance(overrides.get("model"), str):
    overrides["model"] = models.canonical_name(overrides["model"])
  return Config(**PRESETS[name]).replace(**overrides)


def _positive(cfg: Config, *names: str):
  for name in names:
    if not getattr(cfg, name) > 0:   # `not >` also refuses NaN
      raise ConfigError(f"--{name}={getattr(cfg, name)} must be positive")


def _finite_floats(cfg: Config) -> None:
  """NaN or inf in any float setting (learning rates, radii, betas) is refused by name."""
  for field in dataclasses.fields(cfg):
    value = getattr(cfg, field.name)
    if isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f"--{field.name}={value} must be a finite number")


def validate(cfg: Config) -> None:
  """Checks what can be checked without data; raises ConfigError naming the flag."""
  from advmaml import models  # local: keep config import-light
  from advmaml.data import sources
  try:
    sources.check_protocol(cfg.dataset, cfg.split, cfg.rotate)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _finite_floats(cfg)
  _positive(cfg, "n_way", "k_shot", "q_query", "eval_q_query", "image_size", "filters",
            "meta_batch_size", "outer_lr", "num_steps", "log_every", "checkpoint_every",
            "keep_checkpoints", "test_episodes", "eval_batch_tasks", "val_episodes")
  if cfg.n_way < 2:
    raise ConfigError(f"--n_way={cfg.n_way}: a few-shot task needs at least 2 classes")
  for name in ("inner_steps", "eval_inner_steps", "eval_every", "num_devices"):
    if getattr(cfg, name) < 0:
      raise ConfigError(f"--{name}={getattr(cfg, name)} must be >= 0")
  if cfg.task_chunk < -1 or (cfg.task_chunk > 0 and cfg.meta_batch_size % cfg.task_chunk):
    raise ConfigError(f"--task_chunk={cfg.task_chunk} must divide --meta_batch_size="
                      f"{cfg.meta_batch_size}, or be 0 (all tasks at once) or -1 (auto)")
  if not cfg.inner_lr >= 0:
    raise ConfigError(f"--inner_lr={cfg.inner_lr} must be >= 0")
  if cfg.model not in models.names():   # before the loop: old names are flag choices only
    renamed = f" (now called {models.RENAMED[cfg.model]!r})" if cfg.model in models.RENAMED else ""
    raise ConfigError(f"--model={cfg.model!r}{renamed}; choose one of {models.names()}")
  for name, choices in CHOICES.items():   # dataset and split pass: check_protocol checked them
    value, allowed = getattr(cfg, name), choices()
    if value not in allowed:
      raise ConfigError(f"--{name}={value!r}; choose one of {allowed}")
  if cfg.learner != "maml":
    for name in ("first_order", "anil", "meta_sgd", "remat"):
      if getattr(cfg, name):
        raise ConfigError(f"--{name} sets MAML's inner loop; --learner={cfg.learner!r} has none "
                          "(it fits its head in closed form)")
  _validate_heads(cfg)
  if cfg.meta_sgd and cfg.inner_optimizer != "sgd":
    raise ConfigError(f"--meta_sgd learns the inner loop's per-parameter rates, which replace "
                      f"--inner_optimizer={cfg.inner_optimizer!r}; use --inner_optimizer=sgd")
  if cfg.kernels == "reference" and cfg.conv_impl != "im2col":
    raise ConfigError(f"--conv_impl={cfg.conv_impl!r} chooses the cpu kernels' convolution; "
                      "use --kernels=cpu with it (--kernels=reference always runs lax.conv)")
  _validate_train_attack(cfg)


# The learners that read each head field: set away from its default for any other
# learner, a field would be ignored, so it is refused.
_HEAD_FIELDS = {"head_scale": ("protonet", "r2d2", "metaoptnet"),
                "protonet_learn_scale": ("protonet",), "protonet_normalize": ("protonet",),
                "r2d2_lambda": ("r2d2",),
                "svm_c": ("metaoptnet",), "svm_iterations": ("metaoptnet",),
                "svm_eval_iterations": ("metaoptnet",),
                "transfer_classes": ("transfer",)}


def _validate_heads(cfg: Config) -> None:
  """The metric and closed-form heads' fields, and the training shot count."""
  if cfg.train_k_shot < 0:
    raise ConfigError(f"--train_k_shot={cfg.train_k_shot} must be >= 0 (0: --k_shot)")
  if not cfg.head_scale >= 0:
    raise ConfigError(f"--head_scale={cfg.head_scale} must be positive, or 0 for the learner's own")
  _positive(cfg, "r2d2_lambda", "svm_c", "svm_iterations", "svm_eval_iterations")
  if cfg.learner == "transfer" and cfg.transfer_classes < 2:
    raise ConfigError(f"--transfer_classes={cfg.transfer_classes}: --learner=transfer needs "
                      "the meta-train split's class count (Omniglot vinyals with rotations: 4400)")
  if cfg.objective in ("transfer", "transfer_at") and cfg.learner != "transfer":
    raise ConfigError(f"--objective={cfg.objective} trains the transfer baseline's classifier; "
                      f"use --learner=transfer (not {cfg.learner!r})")
  defaults = Config()
  for name, users in _HEAD_FIELDS.items():
    if cfg.learner not in users and getattr(cfg, name) != getattr(defaults, name):
      raise ConfigError(f"--{name} is {', '.join(users)}'s; --learner={cfg.learner!r} does not "
                        f"use it (use --learner={'|'.join(users)}, or leave --{name} unset)")


def train_k_shot(cfg: Config) -> int:
  """Support examples per class in meta-training episodes (``--train_k_shot``, else ``--k_shot``)."""
  return cfg.train_k_shot or cfg.k_shot


def _validate_train_attack(cfg: Config) -> None:
  """The training-time attack flags. ``not x >= 0`` also rejects NaN."""
  for name in ("train_epsilon", "trades_beta", "rmaml_beta"):
    if not getattr(cfg, name) >= 0:
      raise ConfigError(f"--{name}={getattr(cfg, name)} must be >= 0")
  if cfg.train_norm == "linf" and cfg.train_epsilon > 1:
    raise ConfigError(f"--train_epsilon={cfg.train_epsilon} is larger than 1, the whole [0, 1] "
                      "pixel range, so the L-inf attack may replace any image; use a radius "
                      "in [0, 1] (e.g. 0.1, or 8/255=0.0314 on RGB data)")
  if cfg.train_attack_steps < 1:
    raise ConfigError(f"--train_attack_steps={cfg.train_attack_steps} must be >= 1")
  if cfg.train_step_size is not None and not cfg.train_step_size > 0:
    raise ConfigError(f"--train_step_size={cfg.train_step_size} must be positive "
                      "(leave it unset for 2.5 * train_epsilon / train_attack_steps)")
  if cfg.objective == "rmaml" and cfg.train_attack == "apgd":
    raise ConfigError("--train_attack='apgd' is not supported by --objective='rmaml' "
                      "(its KL-maximising attack is FGSM or PGD); use fgsm or pgd")
  try:  # anything else AttackConfig refuses
    train_attack_config(cfg)
  except ValueError as e:
    raise ConfigError(f"training attack: {e}") from e


def validate_against_data(cfg: Config, pools: dict) -> None:
  """Checks episode sizes against the class pools. pools: split -> (C, D, H, W[, C]) array."""
  for split, pool in pools.items():
    num_classes, num_examples = pool.shape[:2]
    if split == "train" and cfg.learner == "transfer" and cfg.transfer_classes != num_classes:
      raise ConfigError(f"--transfer_classes={cfg.transfer_classes} but the {cfg.split!r} train "
                        f"split has {num_classes} classes; use --transfer_classes={num_classes}")
    if cfg.n_way > num_classes:
      raise ConfigError(
          f"--n_way={cfg.n_way} is larger than the {num_classes} classes of the "
          f"{cfg.split!r} {split} split; use --n_way<={num_classes}")
    q = cfg.q_query if split == "train" else cfg.eval_q_query
    flag = "q_query" if split == "train" else "eval_q_query"
    k, k_flag = ((train_k_shot(cfg), "train_k_shot" if cfg.train_k_shot else "k_shot")
                 if split == "train" else (cfg.k_shot, "k_shot"))
    if k + q > num_examples:
      raise ConfigError(
          f"--{k_flag}={k} plus --{flag}={q} needs {k + q} distinct examples "
          f"per class but the {split} split has {num_examples} per class")


def presets_markdown() -> str:
  """Every preset's whole setting, one table per preset, as ``docs/presets.md`` shows them.

  The presets are built above from shared dicts; this is the one place where each can be
  read in full (``python -m experiments.presets`` prints it; a test keeps the file current).
  """
  lines = ["# Presets", "",
           "Generated by `python -m experiments.presets > docs/presets.md` from",
           "`advmaml/config.py` (a test checks it is current). Each table is the preset's",
           "whole setting: the fields it sets, then every other field at the Config default.",
           "Any field can be overridden by its flag (`--<field>=...`).", ""]
  for name, settings in PRESETS.items():
    cfg = preset(name)
    lines += [f"## `{name}`", "", PRESET_HELP[name] + ".", "", "| field | value | set by |",
              "| --- | --- | --- |"]
    fields = [f.name for f in dataclasses.fields(Config)]
    for field in sorted(fields, key=lambda f: (f not in settings, fields.index(f))):
      value = getattr(cfg, field)
      note = "preset" if field in settings else "default"
      lines.append(f"| {field} | `{json.dumps(value)}` | {note} |")
    lines.append("")
  return "\n".join(lines)
