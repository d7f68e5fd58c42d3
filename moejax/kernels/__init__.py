"""The grouped-matmul kernels of the dropless experts, swappable behind one interface.

A backend runs one expert's FFN on each group of rows sorted by expert (group e holds
group_sizes[e] rows): 'ragged_dot' is XLA's grouped matmul (jax.lax.ragged_dot, the TPU/GPU
kernel), 'blocked' (blocked.py) lays the groups out in blocks of one expert each and scans over
them (the exact path for CPU, where ragged_dot is far slower than a dense matmul of the same
FLOPs). grouped.py holds the interface the expert blocks call: grouped_swiglu (sorted rows)
and dropless_swiglu / dropless_combine (a whole dropless output). 'auto' resolves per platform.
"""
from __future__ import annotations

import jax

BACKENDS = ('auto', 'ragged_dot', 'blocked')


def resolve_backend(backend: str) -> str:
  """'auto' -> 'blocked' on CPU, 'ragged_dot' on TPU/GPU; other names as they are."""
  if backend != 'auto':
    return backend
  return 'blocked' if jax.default_backend() == 'cpu' else 'ragged_dot'


def check(moe, fail) -> None:
  """The kernel's settings (model.moe.experts.backend and block_size)."""
  e = moe.experts
  if e.backend not in BACKENDS:
    fail('model.moe.experts.backend', e.backend, f'must be one of {list(BACKENDS)}')
  if not e.block_size >= 0:
    fail('model.moe.experts.block_size', e.block_size, 'must be >= 0 (0: automatic)')
