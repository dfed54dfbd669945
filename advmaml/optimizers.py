"""The inner-loop and outer-loop optimizers, as optax transforms chosen by name.

``--inner_optimizer`` is the update MAML's inner loop applies to the fast
weights (plain SGD by default, as in Finn et al. 2017); ``--outer_optimizer``
updates the meta-parameters (Adam by default). Each name maps to a function
of the learning rate; a new one is one line here (it then appears in the
flags' choices by itself). In code any ``optax.GradientTransformation`` can
be given directly (``MAML(inner_optimizer=...)``, ``make_train_step(optimizer=...)``).
"""

from __future__ import annotations

from typing import Callable

import optax

OptimizerFactory = Callable[[float], optax.GradientTransformation]

INNER_OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd": optax.sgd,
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "nesterov": lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
    "adam": optax.adam,
    "rmsprop": optax.rmsprop,
}

OUTER_OPTIMIZERS: dict[str, OptimizerFactory] = {
    "adam": optax.adam,
    "adamw": optax.adamw,
    "sgd": optax.sgd,
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "nesterov": lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
    "lamb": optax.lamb,
}


def inner_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
  return _make(INNER_OPTIMIZERS, "inner_optimizer", name, learning_rate)


def outer_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
  return _make(OUTER_OPTIMIZERS, "outer_optimizer", name, learning_rate)


def _make(table, flag, name, learning_rate):
  if name not in table:
    raise ValueError(f"--{flag}={name!r}; choose one of {sorted(table)}")
  return table[name](learning_rate)
