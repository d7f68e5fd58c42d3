"""The routed experts: N SwiGLU FFNs held as stacked weights [N, ...].

Entry points, by dispatch family:
- `capacity(buffers [N, C, D])`: every expert processes a fixed-size buffer (batched einsum).
- `dropless(x [T, D], expert_index, gates [T, K])`: the whole dropless output.
- `grouped(x_sorted [M, D], group_sizes [N])`: rows sorted by expert, group e has
  group_sizes[e] rows (the ragged all-to-all path receives rows so).
Backends of the last two: 'ragged_dot' (jax.lax.ragged_dot, the TPU/GPU grouped matmul) and
'blocked' (moe/blocked.py: blocks of `block_size` rows of one expert each and a scan over
blocks; the exact path for CPU, where ragged_dot is much slower than a dense matmul of the same
FLOPs and its backward pass runs out of memory at `moejax.bench`'s shape).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.nn.layers import param_with_axes
from moejax.moe.blocked import blocked_swiglu, fused_dropless


class ExpertBlock(nn.Module):
  """What every routed expert block offers (moe/registry.py EXPERTS): a subclass defines
  weights() (stacked, expert axis first, in the compute dtype `dtype`) and shard(weights), the
  per-device call; these run all of its experts through it."""

  def capacity(self, buffers):
    """[N, C, D] buffers, one per expert -> their outputs."""
    x = nn.with_logical_constraint(buffers.astype(self.dtype), ('expert', None, 'act_embed'))
    return self.shard(self.weights()).capacity(x)  # [N, C, D]

  def grouped(self, x_sorted, group_sizes):
    return self.shard(self.weights()).grouped(x_sorted, group_sizes)

  def dropless(self, x, expert_index, gates):
    """Dropless output of all experts: x [T, D], expert_index and gates [T, K] -> [T, D]."""
    return self.shard(self.weights()).dropless(x, expert_index, gates, 0)


class RoutedExperts(ExpertBlock):
  num_experts: int
  d_model: int
  d_ff: int
  dtype: jnp.dtype = jnp.float32
  backend: str = 'auto'
  block_size: int = 0  # 0: blocked.auto_block

  def setup(self):
    e, d, f = self.num_experts, self.d_model, self.d_ff
    init_in = nn.initializers.normal(stddev=d ** -0.5)
    init_out = nn.initializers.normal(stddev=f ** -0.5)
    self.wi_0 = param_with_axes(self, 'wi_0', (e, d, f), ('expert', 'embed', 'expert_mlp'), init_in)
    self.wi_1 = param_with_axes(self, 'wi_1', (e, d, f), ('expert', 'embed', 'expert_mlp'), init_in)
    self.wo = param_with_axes(self, 'wo', (e, f, d), ('expert', 'expert_mlp', 'embed'), init_out)

  def weights(self):
    """The stacked weights (wi_0 [N, D, F], wi_1 [N, D, F], wo [N, F, D]) in the compute
    dtype, each with the expert axis first, to be split over devices (shard_map in_specs)."""
    return tuple(jnp.asarray(w, self.dtype) for w in (self.wi_0, self.wi_1, self.wo))

  def shard(self, weights) -> 'ExpertShard':
    """The expert block's public per-shard call: this device's slice of weights() (the
    expert axis split), for dispatchers running inside shard_map."""
    return ExpertShard(tuple(weights), self.backend, self.block_size, self.num_experts)


@dataclasses.dataclass(frozen=True)
class ExpertShard:
  """One device's N / EP experts inside shard_map: weights (wi_0, wi_1, wo) [N / EP, ...]."""
  weights: tuple
  backend: str
  block_size: int
  num_experts: int  # N, over all devices

  def capacity(self, buffers):
    """[N / EP, C, D] buffers, one per local expert -> their outputs."""
    with jax.named_scope('experts'):
      return swiglu_experts(buffers.astype(self.weights[0].dtype), *self.weights)

  def grouped(self, x_sorted, group_sizes):
    """Rows sorted by local expert -> their outputs (rows past the groups give 0)."""
    with jax.named_scope('experts'):
      return grouped_swiglu(x_sorted.astype(self.weights[0].dtype), group_sizes, *self.weights,
                            backend=self.backend, block_size=self.block_size)

  def dropless(self, x, index, gates, first):
    """sum over each token's choices of the local experts (global ids first ..
    first + N / EP - 1) of gate * expert(x) [T, D]."""
    with jax.named_scope('experts'):
      return dropless_swiglu(x.astype(self.weights[0].dtype), index, gates,
                             self.weights[0].shape[0], first, self.weights, self.backend,
                             self.block_size, self.num_experts)


def grouped_swiglu(x_sorted, group_sizes, wi_0, wi_1, wo, backend: str = 'auto',
                   block_size: int = 0):
  """Rows sorted by expert [M, D], group e holds group_sizes[e] rows -> [M, D]. Rows past
  sum(group_sizes) belong to no expert and come out zero (dispatchers park rows there)."""
  if resolve_backend(backend) == 'ragged_dot':
    rd = functools.partial(jax.lax.ragged_dot, group_sizes=group_sizes)
    h = jax.nn.silu(rd(x_sorted, wi_0)) * rd(x_sorted, wi_1)
    valid = jnp.arange(x_sorted.shape[0]) < jnp.sum(group_sizes)
    return jnp.where(valid[:, None], rd(h, wo), 0)
  return blocked_swiglu(x_sorted, group_sizes, wi_0, wi_1, wo, block_size)


def dropless_swiglu(x, expert_index, gates, num_local: int, first, weights, backend: str,
                    block_size: int, num_experts: int | None = None):
  """sum over each token's choices among experts first .. first + num_local - 1 (weights
  (wi_0, wi_1, wo) of those experts) of gate * SwiGLU_e(x) [T, D]; other choices add nothing.
  'blocked' runs the fused kernel (tokens gathered per block, no sorted copies); 'ragged_dot'
  sorts the assignments and runs the grouped matmul. num_experts: all the experts the choices
  go to (default num_local), for the automatic block size."""
  if resolve_backend(backend) == 'blocked':
    return fused_dropless(x, expert_index, gates, num_local, first, *weights, block_size,
                          num_experts)
  run = functools.partial(grouped_swiglu, wi_0=weights[0], wi_1=weights[1], wo=weights[2],
                          backend=backend)
  return dropless_combine(x, expert_index, gates, num_local, first, run)


def dropless_combine(x, expert_index, gates, num_local: int, first, grouped):
  """Dropless by sorting: x [T, D], expert_index and gates [T, K] -> sum over each token's
  choices among experts first .. first + num_local - 1 of gate * expert(x) [T, D]; choices of
  other experts add nothing. `grouped(x_sorted, group_sizes)` runs the local experts on rows
  sorted by expert (rows past the groups give 0)."""
  t, k = expert_index.shape
  local = expert_index - first
  mine = (local >= 0) & (local < num_local)
  flat = jnp.where(mine, local, num_local).reshape(-1)  # [T*K]; not mine sorts last
  order = jnp.argsort(flat, stable=True)
  group_sizes = jnp.zeros((num_local,), jnp.int32).at[flat].add(1, mode='drop')
  y_sorted = grouped(x[order // k], group_sizes)  # [T*K, D]
  y_assign = jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True)
  y_assign = y_assign.reshape(t, k, -1)  # [T, K, D]
  return jnp.einsum('tkd,tk->td', y_assign, gates.astype(y_assign.dtype))


def swiglu_experts(x, wi_0, wi_1, wo):
  """Every expert on its own rows: x [E, R, D], weights [E, D, F] / [E, F, D] -> [E, R, D]."""
  h = jax.nn.silu(jnp.einsum('erd,edf->erf', x, wi_0)) * jnp.einsum('erd,edf->erf', x, wi_1)
  return jnp.einsum('erf,efd->erd', h, wo)


def resolve_backend(backend: str) -> str:
  if backend != 'auto':
    return backend
  return 'blocked' if jax.default_backend() == 'cpu' else 'ragged_dot'
