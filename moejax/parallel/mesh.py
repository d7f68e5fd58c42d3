"""Mesh facts, spelled once: the axes, the mesh shape a config asks for, and what the mesh being
traced under says (the batch axes and how many groups they split the batch into, the size of
the expert axis). Every room that needs one of these asks here.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh

from moejax.errors import ConfigError

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')
# Activations' batch is split over every axis but 'tensor'.
BATCH_AXES = ('data', 'fsdp', 'expert')


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """config.mesh -> {axis: size}: the -1 axis resolved, the product checked against the devices.

  Args:
    mesh_cfg: the config's `mesh` section (axis -> size, one of them may be -1).
    num_devices: the devices the mesh must cover exactly.
  Returns:
    {axis: size} over MESH_AXES, multiplying to num_devices.
  """
  def fail(field, value, fix):
    raise ConfigError(f'config.{field}={value!r}: {fix}')

  sizes = {a: int(mesh_cfg[a]) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  for a, s in sizes.items():
    if s == 0 or s < -1:
      fail(f'mesh.{a}', s, 'must be a positive axis size, or -1 to take the remaining devices')
  if len(free) > 1:
    fail(f'mesh.{free[1]}', -1, f'only one mesh axis may be -1 (also -1: mesh.{free[0]})')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      # Blame the axes that were set, not the one that takes the rest.
      named = {a: s for a, s in sizes.items() if s > 1}
      rest = f'(mesh.{free[0]}=-1 takes the rest)'
      if len(named) == 1:
        (axis, size), = named.items()
        fail(f'mesh.{axis}', size, f'does not divide the {num_devices} devices {rest}; pick a '
             f'divisor of {num_devices}')
      fail('mesh', named, f'these axes multiply to {fixed}, which does not divide the '
           f'{num_devices} devices {rest}; make their product divide {num_devices}')
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    fail('mesh', dict(sizes), f'the axis sizes multiply to {math.prod(sizes.values())} but '
         f'there are {num_devices} devices; make the product {num_devices} (or set one axis to -1)')
  return sizes


def make_mesh(sizes: dict[str, int], devices=None) -> Mesh:
  """A Mesh over `devices` (default: all) with the MESH_AXES in order and these sizes."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  return Mesh(devices.reshape(tuple(sizes[a] for a in MESH_AXES)), MESH_AXES)


def batch_axes_in_trace() -> tuple[tuple[str, ...], int]:
  """The batch axes of the mesh being traced under (none outside a mesh) and how many groups
  of devices they split the batch into."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in BATCH_AXES if not mesh.empty and a in mesh.axis_names)
  return axes, int(np.prod([mesh.shape[a] for a in axes]))


def expert_axis_in_trace() -> int:
  """The size of the 'expert' axis of the mesh being traced under (1 outside a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty or 'expert' not in mesh.axis_names else int(mesh.shape['expert'])


def mesh_platform() -> str:
  """The platform ('cpu', 'tpu', 'gpu') of the mesh set by jax.set_mesh, inside a trace or out;
  jax's default backend without one. A program compiled ahead of time for compile-only TPU
  devices (moejax.compile) runs on a CPU host, so the choices that depend on the hardware
  (the dropless kernel, the dispatch path, what the platform can run) ask here, not
  jax.default_backend()."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, 'abstract_device', None)
  return device.platform if device is not None else jax.default_backend()
