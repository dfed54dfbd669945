"""absl flags for every Config field, plus --preset: flags -> Config.

Each field of ``advmaml.config.Config`` becomes a flag of the same name with
no default; only flags given on the command line override the preset. Fields
with a fixed set of values (``advmaml.config.CHOICES``) are enum flags whose
help lists the values, read from the registries when the flags are defined, so
an objective or model registered before then appears by itself.
"""

from __future__ import annotations

import dataclasses
import typing

from absl import flags

from advmaml.config import CHOICES, PRESET_HELP, Config, ConfigError, preset

_DEFINERS = {int: flags.DEFINE_integer, float: flags.DEFINE_float, bool: flags.DEFINE_bool,
             str: flags.DEFINE_string}


def preset_help() -> str:
  """--preset's help: one line per preset (advmaml.config.PRESETS)."""
  return "Named preset of settings; the field flags override it:\n" + "\n".join(
      f"{name}: {line}" for name, line in PRESET_HELP.items())


PRESET = flags.DEFINE_enum("preset", "omniglot_5w1s", list(PRESET_HELP), preset_help())


def _base_type(hint) -> type:
  """int, float, bool or str from a resolved annotation such as ``float | None``."""
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  return args[0] if args else hint


def define_config_flags() -> None:
  """Defines one flag per Config field (call once, at import time of an entry point)."""
  defaults = Config()
  hints = typing.get_type_hints(Config)
  for field in dataclasses.fields(Config):
    help_text = (f"Overrides the preset's {field.name} (Config default: "
                 f"{getattr(defaults, field.name)!r}).")
    if field.name in CHOICES:
      flags.DEFINE_enum(field.name, None, list(CHOICES[field.name]()), help_text)
    else:
      _DEFINERS[_base_type(hints[field.name])](field.name, None, help_text)


def config_from_flags() -> Config:
  """The preset, with every explicitly given field flag applied."""
  overrides = {}
  for field in dataclasses.fields(Config):
    value = flags.FLAGS[field.name].value
    if value is not None:
      overrides[field.name] = value
  try:
    return preset(PRESET.value, **overrides)
  except ConfigError:
    raise
  except TypeError as e:  # pragma: no cover - defensive
    raise ConfigError(str(e)) from e
