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


# The axes that may span slices (the data-center network): their collectives are one gradient
# reduction (data) or a weight gather and gradient scatter per layer (fsdp); the expert and
# tensor axes exchange activations every layer and stay inside a slice's fast interconnect.
DCN_AXES = ('data', 'fsdp')


def granules(devices) -> tuple[str, int]:
  """What joins the devices over the data-center network, and how many there are: TPU slices
  (slice_index), else processes (GPU nodes, CPU hosts; their slice_index, where set, is 0)."""
  if devices[0].platform == 'tpu':  # one slice's devices may have no slice_index at all
    return 'slice', len({getattr(d, 'slice_index', 0) for d in devices})
  return 'process', len({d.process_index for d in devices})


def dcn_shape(mesh_cfg, sizes: dict[str, int], devices) -> dict[str, int]:
  """config.mesh.dcn_* -> {axis: how many slices it spans} over MESH_AXES (1 within a slice).

  Several TPU slices with no dcn_* set: the data axis spans them (what a multi-slice run wants
  unless told otherwise). dcn_* set: their product must be the slices (TPU) or the processes
  (elsewhere: a multi-node GPU or CPU run), and each must divide its axis.
  """
  def fail(field, value, fix):
    raise ConfigError(f'config.{field}={value!r}: {fix}')

  dcn = {a: int(mesh_cfg.get(f'dcn_{a}', 1)) for a in DCN_AXES}
  for a, n in dcn.items():
    if n < 1:
      fail(f'mesh.dcn_{a}', n, 'must be at least 1 (how many slices the axis spans)')
  kind, count = granules(devices)
  kinds = {'slice': 'slices', 'process': 'processes'}[kind]
  if math.prod(dcn.values()) == 1 and kind == 'slice' and count > 1:
    dcn['data'] = count
    if sizes['data'] % count:
      fail('mesh.data', sizes['data'], f'the devices are {count} slices and the data axis spans '
           f'them, so it must be a multiple of {count} (or set mesh.dcn_fsdp={count})')
  if math.prod(dcn.values()) > 1 and math.prod(dcn.values()) != count:
    named = ', '.join(f'mesh.dcn_{a}={n}' for a, n in dcn.items() if n > 1)
    raise ConfigError(f'config.{named}: the dcn axes span {math.prod(dcn.values())} {kinds} but '
                      f'the devices are {count} {kinds if count > 1 else kind}; make their '
                      f'product {count}')
  for a, n in dcn.items():
    if sizes[a] % n:
      fail(f'mesh.dcn_{a}', n, f'must divide mesh.{a}={sizes[a]} (the axis is split over {n} '
           f'{kinds}, an equal share in each)')
  return {a: dcn.get(a, 1) for a in MESH_AXES}


def device_grid(sizes: dict[str, int], dcn: dict[str, int], devices) -> np.ndarray:
  """The devices laid out as the mesh: one slice's devices along the inner factor of every
  axis, the slices along the dcn factors (jax's hybrid mesh helper), in the hardware's
  torus order on TPU; elsewhere (and in one slice) the devices' own order."""
  shape = [sizes[a] for a in MESH_AXES]
  from jax.experimental import mesh_utils
  if math.prod(dcn.values()) > 1:
    inner = [sizes[a] // dcn[a] for a in MESH_AXES]
    return mesh_utils.create_hybrid_device_mesh(
        inner, [dcn[a] for a in MESH_AXES], devices,
        process_is_granule=granules(devices)[0] == 'process', allow_split_physical_axes=True)
  if devices[0].platform != 'tpu':
    return np.asarray(devices).reshape(shape)
  try:
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    # mesh_utils knows no torus-aware layout for some shapes (it raises one of these); the
    # plain order still compiles, only its collectives may take longer ICI routes.
    return np.asarray(devices).reshape(shape)


def make_mesh(sizes: dict[str, int], devices=None, mesh_cfg=None) -> Mesh:
  """A Mesh over `devices` (default: all) with the MESH_AXES in order and these sizes; with
  the config's mesh section, its dcn_* axes span slices (see dcn_shape)."""
  devices = list(devices if devices is not None else jax.devices())
  dcn = dcn_shape(mesh_cfg if mesh_cfg is not None else {}, sizes, devices)
  return Mesh(device_grid(sizes, dcn, devices), MESH_AXES)


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
