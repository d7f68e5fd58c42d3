"""The grouped-matmul kernels of the dropless experts, swappable behind one interface.

A backend runs one expert's FFN on each group of rows sorted by expert (group e holds
group_sizes[e] rows):
- 'ragged_dot': XLA's grouped matmul (jax.lax.ragged_dot), TPU/GPU;
- 'tokamax': tokamax.ragged_dot (Pallas: Mosaic kernels on TPU, Triton on GPU, XLA on CPU), the
  optional `kernels` extra;
- 'blocked' (blocked.py): the groups laid out in blocks of one expert each and a scan over them
  with a hand-written VJP, the exact path for CPU, where the grouped matmuls are far slower
  than a dense matmul of the same FLOPs.
grouped.py holds the interface the expert blocks call. 'auto' resolves per platform: 'blocked'
on CPU (measured: `python -m moejax.bench moe`), 'ragged_dot' on TPU and GPU until a measurement
there says otherwise (`python -m moejax.bench accelerator` times every backend).
"""
from __future__ import annotations

import importlib.util
import sys

import jax

from moejax.parallel.mesh import mesh_platform

BACKENDS = ('auto', 'ragged_dot', 'tokamax', 'blocked')
# The grouped-matmul backends (same call as jax.lax.ragged_dot); 'blocked' is its own kernel.
GROUPED = ('ragged_dot', 'tokamax')


def resolve_backend(backend: str) -> str:
  """'auto' -> 'blocked' on CPU, 'ragged_dot' on TPU/GPU (the platform of the mesh being
  traced); other names as they are."""
  if backend != 'auto':
    return backend
  return 'blocked' if mesh_platform() == 'cpu' else 'ragged_dot'


def ragged_dot(backend: str):
  """The grouped matmul of a backend in GROUPED: (lhs [M, K], rhs [G, K, N], group_sizes [G])
  -> [M, N], rows past sum(group_sizes) zero."""
  if backend == 'tokamax':
    from absl import flags
    if not flags.FLAGS.is_parsed():
      # tokamax reads its absl flags from sys.argv when they are unparsed, which fails on any
      # command line but its own; moejax's commands parse theirs with argparse.
      flags.FLAGS(sys.argv[:1])
    import tokamax
    return tokamax.ragged_dot
  return jax.lax.ragged_dot


def available(backend: str) -> bool:
  """Whether a backend can run here (tokamax is an optional install)."""
  return backend != 'tokamax' or importlib.util.find_spec('tokamax') is not None


def check(moe, fail) -> None:
  """The kernel's settings (model.moe.experts.backend and block_size)."""
  e = moe.experts
  if e.backend not in BACKENDS:
    fail('model.moe.experts.backend', e.backend, f'must be one of {list(BACKENDS)}')
  if not available(e.backend):
    fail('model.moe.experts.backend', e.backend, "tokamax is not installed: pip install "
         "'moejax[kernels]' (or pip install tokamax), or choose 'auto'")
  if not e.block_size >= 0:
    fail('model.moe.experts.block_size', e.block_size, 'must be >= 0 (0: automatic)')
