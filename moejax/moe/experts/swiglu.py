"""The SwiGLU expert block: N SwiGLU FFNs held as stacked weights [N, ...].

Entry points, by dispatch family:
- `capacity(buffers [N, C, D])`: every expert processes a fixed-size buffer (batched einsum).
- `dropless(x [T, D], expert_index, gates [T, K])`: the whole dropless output.
- `grouped(x_sorted [M, D], group_sizes [N])`: rows sorted by expert, group e has
  group_sizes[e] rows (the ragged all-to-all path receives rows so).
The last two run on a kernel backend (moejax/kernels: 'ragged_dot' on TPU/GPU, 'blocked' on CPU).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.kernels.grouped import dropless_swiglu, grouped_swiglu
from moejax.moe.experts.base import ExpertBlock, register
from moejax.nn.layers import param_with_axes


@register('swiglu')
class SwiGLUExperts(ExpertBlock):
  """N SwiGLU experts wo(silu(x wi_0) * (x wi_1)): wi_0, wi_1 [N, D, F], wo [N, F, D]."""
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

  def shard(self, weights) -> 'SwiGLUShard':
    """The expert block's public per-shard call: this device's slice of weights() (the
    expert axis split), for dispatchers running inside shard_map."""
    return SwiGLUShard(tuple(weights), self.backend, self.block_size, self.num_experts)


@dataclasses.dataclass(frozen=True)
class SwiGLUShard:
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


def swiglu_experts(x, wi_0, wi_1, wo):
  """Every expert on its own rows: x [E, R, D], weights [E, D, F] / [E, F, D] -> [E, R, D]."""
  h = jax.nn.silu(jnp.einsum('erd,edf->erf', x, wi_0)) * jnp.einsum('erd,edf->erf', x, wi_1)
  return jnp.einsum('erf,efd->erd', h, wo)
