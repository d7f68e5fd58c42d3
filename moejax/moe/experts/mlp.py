"""A second routed expert block: N two-matrix FFNs, act(x W_in) W_out, without a gate (the
experts of Shazeer 2017 and Switch, ReLU; GShard and V-MoE, GELU). Chosen by
model.moe.experts.name='mlp' with model.moe.experts.activation.

It keeps the expert block's contract (moe/experts/base.py): weights() stacked with the expert axis
first, and shard(weights) whose capacity / grouped / dropless calls are all any dispatcher
makes, so every dispatch path, expert parallelism included, runs it unchanged. Its grouped
experts run on 'ragged_dot' (TPU/GPU) or 'blocked' (CPU: blocks of one expert each,
differentiated by autodiff; kernels/blocked.py blocked_ffn); dropless sorts the (token, choice)
pairs by expert (experts.dropless_combine).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.kernels import GROUPED, ragged_dot, resolve_backend
from moejax.kernels.blocked import blocked_ffn
from moejax.kernels.grouped import dropless_combine
from moejax.moe.experts.base import ExpertBlock, register
from moejax.nn.layers import param_with_axes

ACTIVATIONS = {'gelu': functools.partial(jax.nn.gelu, approximate=False), 'relu': jax.nn.relu}


@register('mlp')
class MLPExperts(ExpertBlock):
  """N two-matrix experts act(x wi) wo: wi [N, D, F], wo [N, F, D]; activation GELU or ReLU."""
  num_experts: int
  d_model: int
  d_ff: int
  dtype: jnp.dtype = jnp.float32
  activation: str = 'gelu'
  backend: str = 'auto'
  block_size: int = 0

  READS = ('experts.activation',)  # its own config fields (the kernel's: the dispatchers')

  @classmethod
  def check(cls, moe, fail):
    if moe.experts.activation not in ACTIVATIONS:
      fail('model.moe.experts.activation', moe.experts.activation,
           f'must be one of {list(ACTIVATIONS)}')

  def setup(self):
    e, d, f = self.num_experts, self.d_model, self.d_ff
    self.wi = param_with_axes(self, 'wi', (e, d, f), ('expert', 'embed', 'expert_mlp'),
                              nn.initializers.normal(stddev=d ** -0.5))
    self.wo = param_with_axes(self, 'wo', (e, f, d), ('expert', 'expert_mlp', 'embed'),
                              nn.initializers.normal(stddev=f ** -0.5))

  def weights(self):
    """(wi [N, D, F], wo [N, F, D]) in the compute dtype, expert axis first."""
    return tuple(jnp.asarray(w, self.dtype) for w in (self.wi, self.wo))

  def shard(self, weights) -> 'MLPShard':
    return MLPShard(tuple(weights), self.activation, self.backend, self.block_size)


@dataclasses.dataclass(frozen=True)
class MLPShard:
  """One device's N / EP experts: weights (wi, wo) [N / EP, ...]."""
  weights: tuple
  activation: str
  backend: str
  block_size: int

  def _one(self, x, wi, wo):
    return ACTIVATIONS[self.activation](x @ wi) @ wo

  def capacity(self, buffers):
    """[N / EP, C, D] buffers, one per local expert -> their outputs."""
    wi, wo = self.weights
    with jax.named_scope('experts'):
      h = ACTIVATIONS[self.activation](jnp.einsum('ecd,edf->ecf', buffers.astype(wi.dtype), wi))
      return jnp.einsum('ecf,efd->ecd', h, wo)

  def grouped(self, x_sorted, group_sizes):
    """Rows sorted by local expert -> their outputs (rows past the groups give 0)."""
    wi, wo = self.weights
    x_sorted = x_sorted.astype(wi.dtype)
    with jax.named_scope('experts'):
      backend = resolve_backend(self.backend)
      if backend in GROUPED:
        rd = ragged_dot(backend)
        h = ACTIVATIONS[self.activation](rd(x_sorted, wi, group_sizes))
        valid = jnp.arange(x_sorted.shape[0]) < jnp.sum(group_sizes)
        return jnp.where(valid[:, None], rd(h, wo, group_sizes), 0)
      return blocked_ffn(x_sorted, group_sizes, self._one, self.weights, self.block_size)

  def dropless(self, x, index, gates, first):
    """sum over each token's choices among the local experts (first .. first + N / EP - 1)
    of gate * expert(x) [T, D]; other choices add nothing."""
    with jax.named_scope('experts'):
      return dropless_combine(x.astype(self.weights[0].dtype), index, gates,
                              self.weights[0].shape[0], first, self.grouped)
