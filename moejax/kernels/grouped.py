"""The kernel interface of the dropless experts: grouped SwiGLU over rows sorted by expert, and
a whole dropless output (sum over a token's choices of gate x expert(x)), on the chosen backend.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moejax.kernels import GROUPED, ragged_dot, resolve_backend
from moejax.kernels.blocked import blocked_swiglu, fused_dropless


def grouped_swiglu(x_sorted, group_sizes, wi_0, wi_1, wo, backend: str = 'auto',
                   block_size: int = 0):
  """Rows sorted by expert [M, D], group e holds group_sizes[e] rows -> [M, D]. Rows past
  sum(group_sizes) belong to no expert and come out zero (dispatchers park rows there)."""
  backend = resolve_backend(backend)
  if backend in GROUPED:
    rd = functools.partial(ragged_dot(backend), group_sizes=group_sizes)
    h = jax.nn.silu(rd(x_sorted, wi_0)) * rd(x_sorted, wi_1)
    valid = jnp.arange(x_sorted.shape[0]) < jnp.sum(group_sizes)
    return jnp.where(valid[:, None], rd(h, wo), 0)
  return blocked_swiglu(x_sorted, group_sizes, wi_0, wi_1, wo, block_size)


def dropless_swiglu(x, expert_index, gates, num_local: int, first, weights, backend: str,
                    block_size: int, num_experts: int | None = None):
  """sum over each token's choices among experts first .. first + num_local - 1 (weights
  (wi_0, wi_1, wo) of those experts) of gate * SwiGLU_e(x) [T, D]; other choices add nothing.
  'blocked' runs the fused kernel (tokens gathered per block, no sorted copies); 'ragged_dot'
  and 'tokamax' sort the assignments and run their grouped matmul. num_experts: all the experts the choices
  go to (default num_local), for the automatic block size."""
  if resolve_backend(backend) == 'blocked':
    return fused_dropless(x, expert_index, gates, num_local, first, *weights, block_size,
                          num_experts)
  run = functools.partial(grouped_swiglu, wi_0=weights[0], wi_1=weights[1], wo=weights[2],
                          backend=backend)
  return dropless_combine(x, expert_index, gates, num_local, first, run)


def dropless_combine(x, expert_index, gates, num_local: int, first, grouped,
                     expert_sums: bool = False):
  """Dropless by sorting: x [T, D], expert_index and gates [T, K] -> sum over each token's
  choices among experts first .. first + num_local - 1 of gate * expert(x) [T, D]; choices of
  other experts add nothing. `grouped(x_sorted, group_sizes)` runs the local experts on rows
  sorted by expert (rows past the groups give 0). With expert_sums, also each local expert's
  sum of its (ungated) outputs [num_local, D] and its row count [num_local]."""
  t, k = expert_index.shape
  local = expert_index - first
  mine = (local >= 0) & (local < num_local)
  flat = jnp.where(mine, local, num_local).reshape(-1)  # [T*K]; not mine sorts last
  order = jnp.argsort(flat, stable=True)
  group_sizes = jnp.zeros((num_local,), jnp.int32).at[flat].add(1, mode='drop')
  y_sorted = grouped(x[order // k], group_sizes)  # [T*K, D]
  y_assign = jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True)
  y_assign = y_assign.reshape(t, k, -1)  # [T, K, D]
  y = jnp.einsum('tkd,tk->td', y_assign, gates.astype(y_assign.dtype))
  if not expert_sums:
    return y
  sums = jax.ops.segment_sum(y_sorted, flat[order], num_segments=num_local + 1)[:num_local]
  return y, sums, group_sizes
