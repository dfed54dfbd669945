"""Command-line flags of the Config fields: enum flags from the registries, --preset's help."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from advmaml import objectives
from advmaml.config import CHOICES, PRESET_HELP, PRESETS, ConfigError, preset, validate

REPO = pathlib.Path(__file__).resolve().parents[1]


def _train(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


def test_help_lists_the_choices_of_every_enum_field_and_one_line_per_preset():
  out = _train("--helpfull")   # absl prints the help to stdout and exits 1
  assert "--preset" in out.stdout, out.stderr[-2000:]
  # absl wraps long help lines; join them back before looking for "<a|b|c>".
  text = "".join(line.strip() for line in out.stdout.splitlines())
  for name, choices in CHOICES.items():
    assert f"--{name}: <{'|'.join(choices())}>" in text, name
  assert "<adml|adv_support|aq|natural|rmaml|transfer|transfer_at>" in text  # robust ones too
  lines = [line.strip() for line in out.stdout.splitlines()]
  for name, line in PRESET_HELP.items():
    assert f"{name}: {line}" in lines
  assert set(PRESET_HELP) == set(PRESETS) and all(PRESET_HELP.values())


@pytest.mark.parametrize("flag", ["--objective=nope", "--model=resnet", "--train_norm=l1",
                                  "--preset=nope"])
def test_a_bad_value_fails_naming_the_flag_and_the_choices(flag, tmp_path):
  out = _train(f"--workdir={tmp_path}", flag)
  name, value = flag[2:].split("=")
  assert out.returncode != 0
  assert f"--{name}={value}" in out.stderr and "should be one of" in out.stderr
  assert "Traceback" not in out.stderr and not any(tmp_path.iterdir())


def test_a_registered_objective_becomes_a_choice(monkeypatch):
  cfg = preset("tiny", objective="dummy")
  with pytest.raises(ConfigError, match="--objective='dummy'; choose one of"):
    validate(cfg)
  monkeypatch.setitem(objectives.OBJECTIVES, "dummy", lambda cfg: objectives.natural)
  assert "dummy" in CHOICES["objective"]()
  validate(cfg)


def test_validate_checks_every_enum_field():
  for name in CHOICES:
    if name in ("dataset", "split"):   # sources.check_protocol's own messages
      continue
    with pytest.raises(ConfigError, match=f"--{name}='bogus'; choose one of"):
      validate(preset("tiny", **{name: "bogus"}))
  assert set(CHOICES["split"]()) == {"vinyals", "lake", "ravi", "bertinetto", "oreshkin"}


def test_the_evaluation_flags_with_fixed_values_are_enums_too():
  out = subprocess.run([sys.executable, "-m", "experiments.evaluate", "--helpfull"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  text = "".join(line.strip() for line in out.stdout.splitlines())
  for listed in ("--split: <train|val|test>", "--norm: <linf|l2>",
                 "--attack_target: <query|support|both>",
                 "--attack_preset: <fast|strong|autoattack>"):
    assert listed in text, listed
