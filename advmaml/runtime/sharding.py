"""Data parallelism over tasks: one Mesh axis, "tasks", across local (or global) devices.

The meta-batch of tasks is split over the devices with a sharding constraint
inside the jitted step; parameters, optimizer state and the class pool are
replicated. XLA's SPMD partitioner then runs each device's share of tasks and
all-reduces the meta-gradient, so the same code runs on 1 CPU, 8 GPUs or a TPU
slice (``jit`` with ``NamedSharding``; no pmap).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

TASK_AXIS = "tasks"


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh over the first ``num_devices`` devices (0: all of them)."""
  devices = jax.devices()
  if num_devices < 0 or num_devices > len(devices):
    raise ValueError(f"--num_devices={num_devices} not in 0..{len(devices)}: {len(devices)} "
                     f"{devices[0].platform} device(s) here; use 0 for all of them (on CPU, "
                     "XLA_FLAGS=--xla_force_host_platform_device_count=N simulates N)")
  return Mesh(np.array(devices[:num_devices or len(devices)]), (TASK_AXIS,))


def dividing_device_count(num_tasks: int) -> int:
  """The most devices, up to all of them, over which ``num_tasks`` tasks split evenly
  (what ``--num_devices=0`` means for training: 32 tasks on 6 devices use 4)."""
  return max(n for n in range(1, len(jax.devices()) + 1) if num_tasks % n == 0)


def device_count(mesh: Mesh | None) -> int:
  """Devices a step on ``mesh`` is split over (1 without a mesh)."""
  return 1 if mesh is None else mesh.devices.size


def check_divisible(meta_batch_size: int, mesh: Mesh) -> None:
  n = device_count(mesh)
  if meta_batch_size % n:
    raise ValueError(f"--meta_batch_size={meta_batch_size} does not split over {n} devices; "
                     f"use a multiple of {n} or set --num_devices")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def by_task(mesh: Mesh) -> NamedSharding:
  """Leading (task) axis split over the mesh, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(TASK_AXIS))


def shard_tasks(tasks, mesh: Mesh | None):
  """Inside jit: constrains every array of ``tasks`` (leading task axis) to be split over devices."""
  if device_count(mesh) == 1:
    return tasks
  return jax.lax.with_sharding_constraint(tasks, by_task(mesh))


def replicate(tree, mesh: Mesh | None):
  """Places a pytree on every device of the mesh (or leaves it as is without one)."""
  if mesh is None:
    return tree
  return jax.device_put(tree, replicated(mesh))
