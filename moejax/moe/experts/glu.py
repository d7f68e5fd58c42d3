"""Gated experts with the options SwiGLU's fused kernel does not have: biases on the three
projections, clamping, a sigmoid gain and an offset on the up projection.

  gate = x wi_0 + bi_0,  up = x wi_1 + bi_1           (biases when `bias`)
  gate = min(gate, limit),  up = clip(up, -limit, limit)   (when limit > 0)
  y = (gate * sigmoid(alpha * gate) * (up + up_offset)) wo + bo

alpha 1, up_offset 0, limit 0, no bias is SwiGLU; alpha 1.702, up_offset 1, limit 7 with biases
is the clamped variant of gpt-oss; alpha 1, limit > 0 a clamped SwiGLU. Chosen by
model.moe.experts.name='glu'. It keeps the expert block's contract (base.py), so every dispatch
path runs it; its grouped experts run on 'ragged_dot' / 'tokamax' (TPU/GPU) or 'blocked' (CPU,
differentiated by autodiff), and dropless sorts the (token, choice) pairs by expert.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.kernels import GROUPED, ragged_dot, resolve_backend
from moejax.kernels.blocked import blocked_ffn
from moejax.kernels.grouped import dropless_combine
from moejax.moe.experts.base import ExpertBlock, register
from moejax.nn.layers import param_with_axes


def glu(gate, up, alpha: float, up_offset: float, limit: float):
  """The activation: gate [.., F], up [.., F] -> gate * sigmoid(alpha gate) * (up + up_offset),
  both clamped first when limit > 0 (the gate from above only)."""
  if limit:
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
  return gate * jax.nn.sigmoid(alpha * gate) * (up + up_offset)


@register('glu')
class GLUExperts(ExpertBlock):
  """N gated experts: wi_0, wi_1 [N, D, F], wo [N, F, D]; with `bias`, bi_0, bi_1 [N, F] and
  bo [N, D]. alpha: the sigmoid's gain; up_offset: added to the up projection; limit: the
  clamp (0: none); bias: biases on the three projections."""
  num_experts: int
  d_model: int
  d_ff: int
  dtype: jnp.dtype = jnp.float32
  alpha: float = 1.0
  up_offset: float = 0.0
  limit: float = 0.0
  bias: bool = False
  backend: str = 'auto'
  block_size: int = 0

  READS = ('experts.alpha', 'experts.up_offset', 'experts.limit', 'experts.bias')

  @classmethod
  def check(cls, moe, fail):
    e = moe.experts
    if not e.limit >= 0:
      fail('model.moe.experts.limit', e.limit, 'must be >= 0 (0: no clamp)')
    if not e.alpha > 0:
      fail('model.moe.experts.alpha', e.alpha, 'must be a positive number')

  def setup(self):
    e, d, f = self.num_experts, self.d_model, self.d_ff
    init_in = nn.initializers.normal(stddev=d ** -0.5)
    axes_in = ('expert', 'embed', 'expert_mlp')
    self.wi_0 = param_with_axes(self, 'wi_0', (e, d, f), axes_in, init_in)
    self.wi_1 = param_with_axes(self, 'wi_1', (e, d, f), axes_in, init_in)
    self.wo = param_with_axes(self, 'wo', (e, f, d), ('expert', 'expert_mlp', 'embed'),
                              nn.initializers.normal(stddev=f ** -0.5))
    if self.bias:
      zeros = nn.initializers.zeros
      self.bi_0 = param_with_axes(self, 'bi_0', (e, f), ('expert', 'expert_mlp'), zeros)
      self.bi_1 = param_with_axes(self, 'bi_1', (e, f), ('expert', 'expert_mlp'), zeros)
      self.bo = param_with_axes(self, 'bo', (e, d), ('expert', 'embed'), zeros)

  def weights(self):
    """(wi_0, wi_1, wo[, bi_0, bi_1, bo]) in the compute dtype, expert axis first."""
    names = ('wi_0', 'wi_1', 'wo') + (('bi_0', 'bi_1', 'bo') if self.bias else ())
    return tuple(jnp.asarray(getattr(self, n), self.dtype) for n in names)

  def shard(self, weights) -> 'GLUShard':
    return GLUShard(tuple(weights), self.alpha, self.up_offset, self.limit, self.backend,
                    self.block_size)


@dataclasses.dataclass(frozen=True)
class GLUShard:
  """One device's N / EP experts: weights (wi_0, wi_1, wo[, bi_0, bi_1, bo]) [N / EP, ...]."""
  weights: tuple
  alpha: float
  up_offset: float
  limit: float
  backend: str
  block_size: int

  def _act(self, gate, up):
    return glu(gate, up, self.alpha, self.up_offset, self.limit)

  def _one(self, x, wi_0, wi_1, wo, *biases):
    """One expert on its rows x [R, D] -> [R, D]."""
    gate, up = x @ wi_0, x @ wi_1
    if biases:
      gate, up = gate + biases[0], up + biases[1]
    y = self._act(gate, up) @ wo
    return y + biases[2] if biases else y

  def capacity(self, buffers):
    """[N / EP, C, D] buffers, one per local expert -> their outputs."""
    with jax.named_scope('experts'):
      return jax.vmap(self._one)(buffers.astype(self.weights[0].dtype), *self.weights)

  def grouped(self, x_sorted, group_sizes):
    """Rows sorted by local expert -> their outputs (rows past the groups give 0)."""
    w = self.weights
    x_sorted = x_sorted.astype(w[0].dtype)
    with jax.named_scope('experts'):
      backend = resolve_backend(self.backend)
      if backend not in GROUPED:
        return blocked_ffn(x_sorted, group_sizes, self._one, w, self.block_size)
      rd = ragged_dot(backend)
      m = x_sorted.shape[0]
      gate, up = rd(x_sorted, w[0], group_sizes), rd(x_sorted, w[1], group_sizes)
      if len(w) > 3:  # each row's expert picks its bias
        row_expert = jnp.repeat(jnp.arange(w[0].shape[0]), group_sizes, total_repeat_length=m)
        gate, up = gate + w[3][row_expert], up + w[4][row_expert]
      y = rd(self._act(gate, up), w[2], group_sizes)
      if len(w) > 3:
        y = y + w[5][row_expert]
      valid = jnp.arange(m) < jnp.sum(group_sizes)
      return jnp.where(valid[:, None], y, 0)

  def dropless(self, x, index, gates, first):
    """sum over each token's choices among the local experts (first .. first + N / EP - 1)
    of gate * expert(x) [T, D]; other choices add nothing."""
    with jax.named_scope('experts'):
      return dropless_combine(x.astype(self.weights[0].dtype), index, gates,
                              self.weights[0].shape[0], first, self.grouped)
