"""TPU chips and topologies by the names users book: 'v5p-128' -> 64 chips of v5p in a 4x4x4
torus, as compile-only devices of XLA's TPU compiler (libtpu) on a CPU host.

A slice name is GENERATION-N. For v4 and v5p, N counts TensorCores (two per chip: v5p-128 is 64
chips); for v5e and v6e it counts chips (v5e-16 is 16 chips), as Cloud TPU names them. The chip
figures are the vendor's data sheets (Cloud TPU documentation, 'System architecture' of each
generation): dense bf16 peak, HBM bandwidth, bidirectional ICI bandwidth per chip, DCN per
chip; the HBM a program may use is the compiler's own figure (`usable_hbm`), not the sheet's.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import re

from moejax.errors import ConfigError

INSTALL = ('XLA\'s TPU compiler (libtpu) is not installed: pip install "moejax[tpu]" (or pip '
           'install "jax[tpu]==<your jax version>"), then run this again; it compiles for TPUs '
           'from this CPU machine, no TPU needed')


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation's chip (figures per chip)."""
  generation: str  # the name users book: v4, v5e, v5p, v6e
  topology_prefix: str  # libtpu's topology name prefix
  chip_config: str  # libtpu's chip_config_name ('megacore': one device per chip)
  dims: int  # torus dimensions (3 for v4/v5p, 2 for v5e/v6e)
  cores_in_name: bool  # whether N in 'GEN-N' counts TensorCores (2 per chip) instead of chips
  peak_tflops: float  # dense bf16
  hbm_gbps: float  # HBM bandwidth, GB/s
  ici_gbps: float  # bidirectional inter-chip interconnect bandwidth per chip, GB/s
  dcn_gbps: float  # data-center network bandwidth per chip, GB/s (between slices)
  max_chips: int  # the largest single slice


CHIPS = {c.generation: c for c in (
    # v4: 275 TFLOP/s, 32 GiB at 1200 GB/s, ICI 2400 Gbit/s (300 GB/s), 3D torus.
    Chip('v4', 'v4', 'megacore', 3, True, 275.0, 1200.0, 300.0, 6.25, 4096),
    # v5e: 197 TFLOP/s, 16 GB at 819 GB/s, ICI 400 GB/s, 2D torus, 256 chips; 2 x 100 Gbit/s
    # NICs per 8-chip host (3.1 GB/s per chip).
    Chip('v5e', 'v5e', 'default', 2, False, 197.0, 819.0, 400.0, 3.125, 256),
    # v5p: 459 TFLOP/s, 95 GiB at 2765 GB/s, ICI 1200 GB/s, DCN 50 Gbit/s per chip.
    Chip('v5p', 'v5p', 'megacore', 3, True, 459.0, 2765.0, 1200.0, 6.25, 6144),
    # v6e (Trillium): 918 TFLOP/s, 32 GB at 1638 GB/s, ICI 800 GB/s, 2D torus, 256 chips.
    Chip('v6e', 'v6e', 'default', 2, False, 918.0, 1638.0, 800.0, 6.25, 256),
)}
ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'v6': 'v6e', 'trillium': 'v6e'}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A booked slice (or several): the chip, the chips per slice and their torus shape."""
  name: str  # as given, e.g. 'v5p-128'
  chip: Chip
  chips: int  # per slice
  shape: tuple  # the torus, e.g. (4, 4, 4)
  slices: int = 1

  @property
  def libtpu_name(self) -> str:
    return f"{self.chip.topology_prefix}:{'x'.join(map(str, self.shape))}"

  @property
  def total_chips(self) -> int:
    return self.chips * self.slices


def torus_shape(chips: int, dims: int) -> tuple:
  """The usual slice shape of `chips` chips: 2D slices 1x1, 2x2, 2x4, 4x4, 4x8, ... (v5e, v6e);
  3D slices 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ... (v4, v5p), as Cloud TPU lists them."""
  if chips < 1 or chips & (chips - 1):
    raise ValueError(chips)
  if dims == 2:
    a = 1 << (int(math.log2(chips)) // 2)
    return (a, chips // a)
  if chips < 4:
    raise ValueError(chips)
  shape = [2, 2, 1]
  while math.prod(shape) < chips:
    i = min(range(3), key=lambda j: (shape[j], -j))  # double the smallest, the last first
    shape[i] *= 2
  return (2, 2, 1) if chips == 4 else tuple(sorted(shape))


def parse_topology(name: str, slices: int = 1) -> Topology:
  """'v5p-128' (or 'v5e-16', 'v6e-8', 'v4-32') -> its Topology; ConfigError naming the flag."""
  m = re.fullmatch(r'\s*([a-z0-9]+)-(\d+)\s*', name.lower())
  gens = ', '.join(sorted(CHIPS))
  if not m:
    raise ConfigError(f'--topology={name!r}: write GENERATION-N as Cloud TPU names slices, e.g. '
                      f'v5p-128 (64 chips), v5e-16, v6e-8 (generations: {gens})')
  gen = ALIASES.get(m.group(1), m.group(1))
  if gen not in CHIPS:
    raise ConfigError(f'--topology={name!r}: unknown TPU generation {m.group(1)!r}; one of '
                      f'{gens}')
  chip, n = CHIPS[gen], int(m.group(2))
  chips = n // 2 if chip.cores_in_name else n
  unit = 'TensorCores, 2 per chip' if chip.cores_in_name else 'chips'
  smallest = 8 if chip.cores_in_name else 1
  if (chip.cores_in_name and n % 2) or chips < 1 or chips & (chips - 1) or (
      chip.dims == 3 and chips < 4) or chips > chip.max_chips:
    largest = chip.max_chips * (2 if chip.cores_in_name else 1)
    raise ConfigError(f'--topology={name!r}: {gen}-N counts {unit}; N must be a power of two '
                      f'from {smallest} to {largest}')
  if slices < 1:
    raise ConfigError(f'--slices={slices}: must be at least 1')
  return Topology(name, chip, chips, torus_shape(chips, chip.dims), slices)


def libtpu_installed() -> bool:
  return importlib.util.find_spec('libtpu') is not None


def _quiet_libtpu(topology: Topology):
  """libtpu looks for the TPU VM it runs on (metadata server, worker hostnames) and prints
  warnings when there is none; these settings tell it this host compiles only."""
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  # Compiling needs no TPU to itself: let other processes (a second compile, a test worker)
  # load libtpu at the same time instead of failing on its lockfile.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  import moejax
  placeholder = getattr(moejax, 'NO_TPU_ACCELERATOR_TYPE', None)
  if os.environ.get('TPU_ACCELERATOR_TYPE', placeholder) == placeholder:  # unset or moejax's
    os.environ['TPU_ACCELERATOR_TYPE'] = (
        f'{topology.chip.generation}-{topology.chips * (2 if topology.chip.cores_in_name else 1)}')


@functools.lru_cache(maxsize=None)
def _devices(libtpu_name: str, chip_config: str, dims: int, slices: int):
  from jax.experimental import topologies
  shape = tuple(int(s) for s in libtpu_name.split(':')[1].split('x'))
  host = (min(shape[0], 2), min(shape[1], 2), 1) if dims == 3 or math.prod(shape) > 1 else (
      1, 1, 1)
  desc = topologies.get_topology_desc(platform='tpu', topology_name=libtpu_name,
                                      chip_config_name=chip_config, chips_per_host_bounds=host,
                                      num_slices=slices)
  return tuple(desc.devices)


def devices(topology: Topology) -> list:
  """The compile-only devices of the topology (all slices), in libtpu's order."""
  if not libtpu_installed():
    raise ConfigError(INSTALL)
  _quiet_libtpu(topology)
  return list(_devices(topology.libtpu_name, topology.chip.chip_config, topology.chip.dims,
                       topology.slices))


@functools.lru_cache(maxsize=None)
def _probe_hbm(device) -> float:
  import jax
  import jax.numpy as jnp
  from jax.sharding import SingleDeviceSharding
  # An output of 2^40 bytes cannot fit: the compiler's refusal names what it has.
  f = jax.jit(lambda x: jnp.broadcast_to(x, (1 << 18, 1 << 20)) * 2,
              in_shardings=SingleDeviceSharding(device))
  try:
    f.lower(jax.ShapeDtypeStruct((1 << 20,), jnp.float32)).compile()
  except Exception as e:  # noqa: BLE001 (the compiler's out-of-memory error)
    found = parse_oom(str(e))
    if found and found.get('available_bytes'):
      return found['available_bytes']
  raise RuntimeError('could not read the usable HBM from the TPU compiler')


def usable_hbm(topology: Topology) -> float:
  """Bytes of HBM per chip that XLA's TPU compiler lets one program use (its own figure, read
  from its out-of-memory message for a program that cannot fit; e.g. 95.74 GiB on v5p)."""
  return _probe_hbm(devices(topology)[0])


_UNITS = {'': 1, 'B': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


def _bytes(number: str, unit: str) -> float:
  return float(number) * _UNITS[unit.upper().rstrip('IB') or 'B']


def parse_oom(message: str) -> dict | None:
  """The numbers of XLA's TPU out-of-memory error ({'required_bytes', 'available_bytes'} and
  the text), or None when the message is not one."""
  if 'RESOURCE_EXHAUSTED' not in message and 'Ran out of memory' not in message:
    return None
  out = {'message': message.strip().splitlines()[0][:400],
         # HBM (the chip's memory) or VMEM (its on-chip scratch memory, which a kernel's tiles
         # must fit: a compile error of that kernel at these shapes, not of the model's size).
         'memory': 'vmem' if 'vmem' in message.lower() else 'hbm'}
  m = re.search(r'required for [^(]*\(([\d.]+)([KMGT]?)i?B?\)\s+exceeds available HBM '
                r'\(([\d.]+)([KMGT]?)i?B?\)', message)
  if m:
    out['required_bytes'] = _bytes(m.group(1), m.group(2))
    out['available_bytes'] = _bytes(m.group(3), m.group(4))
  m = re.search(r'Used ([\d.]+)([KMGT]?)i?B? of ([\d.]+)([KMGT]?)i?B? hbm', message)
  if m:
    out['required_bytes'] = _bytes(m.group(1), m.group(2))
    out['available_bytes'] = _bytes(m.group(3), m.group(4))
  return out
