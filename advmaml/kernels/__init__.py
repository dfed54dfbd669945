"""Kernel sets: the convolution, batch norm and max-pool a model runs on, chosen per backend.

A kernel set is a hashable object with three methods::

    conv(x (B, H, W, C), kernel (kh, kw, C, O), stride) -> (B, ceil(H/s), ceil(W/s), O)  # 'SAME'
    batch_norm(x (..., C), scale (C,), bias (C,), epsilon) -> (..., C)  # x's own statistics
    max_pool(x (B, H, W, C)) -> (B, H//2, W//2, C)                      # 2x2, stride 2

* ``"reference"`` (``kernels.reference``): plain JAX, every transformation
  (forward mode included); XLA's own convolution.
* ``"cpu"`` (``kernels.cpu``): im2col in cache-sized image chunks and
  closed-form backward passes, tuned for XLA's CPU backend; ``custom_vjp``, so
  reverse mode only (to any order).
* ``"auto"``: ``cpu`` on a CPU, ``reference`` on a GPU or TPU, from
  ``jax.default_backend()`` when the model is built. The GPU/TPU choice has not
  been measured on either.

Everything that depends on the hardware (the backend, the CPU chunk budget) is
fixed here, when the model is built, never read while a step is traced.
"""

from __future__ import annotations

import jax

from advmaml.runtime import host
from advmaml.kernels.cpu import CONV_IMPLS, ChunkBudget, CpuKernels
from advmaml.kernels.reference import ReferenceKernels

KERNELS = ("auto", "reference", "cpu")


def resolve(name: str, backend: str | None = None) -> str:
  """"reference" or "cpu" for ``name``; "auto" by ``backend`` (default: JAX's default backend)."""
  if name not in KERNELS:
    raise ValueError(f"unknown kernels {name!r}; choose one of {KERNELS}")
  if name != "auto":
    return name
  backend = jax.default_backend() if backend is None else backend
  return "cpu" if backend == "cpu" else "reference"


def make_kernels(name: str = "auto", conv_impl: str = "im2col",
                 cores_per_device: int | None = None) -> CpuKernels | ReferenceKernels:
  """The kernel set ``name`` for this process's default backend.

  conv_impl: the CPU kernels' convolution (``kernels.cpu.CONV_IMPLS``); the
  reference kernels always use ``lax.conv``. cores_per_device: cores of each
  device the model's steps run on (``host.cores_per_device`` of the device
  count; None: all usable cores, one device); it sizes the CPU kernels' image
  chunks there. On an accelerator the CPU kernels never chunk: it wants the
  whole batch in one matmul.
  """
  if resolve(name) == "reference":
    return ReferenceKernels()
  budget = None
  if jax.default_backend() == "cpu":
    cores = host.usable_cores() if cores_per_device is None else cores_per_device
    budget = ChunkBudget.for_cores(cores)
  return CpuKernels(conv_impl, budget)


__all__ = ["CONV_IMPLS", "KERNELS", "ChunkBudget", "CpuKernels", "ReferenceKernels",
           "make_kernels", "resolve"]
