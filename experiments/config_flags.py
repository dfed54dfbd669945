"""absl flags for every Config field, plus --preset: flags -> Config.

Each field of ``advmaml.config.Config`` becomes a flag of the same name with
no default; only flags given on the command line override the preset.
"""

from __future__ import annotations

import dataclasses
import typing

from absl import flags

from advmaml.config import Config, ConfigError, preset

_DEFINERS = {int: flags.DEFINE_integer, float: flags.DEFINE_float, bool: flags.DEFINE_bool,
             str: flags.DEFINE_string}

PRESET = flags.DEFINE_string("preset", "omniglot_5w1s", "Named preset (see advmaml.config.PRESETS).")


def _base_type(hint) -> type:
  """int, float, bool or str from a resolved annotation such as ``float | None``."""
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  return args[0] if args else hint


def define_config_flags() -> None:
  """Defines one flag per Config field (call once, at import time of an entry point)."""
  defaults = Config()
  hints = typing.get_type_hints(Config)
  for field in dataclasses.fields(Config):
    kind = _base_type(hints[field.name])
    _DEFINERS[kind](field.name, None,
                    f"Overrides the preset's {field.name} (Config default: {getattr(defaults, field.name)!r}).")


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
