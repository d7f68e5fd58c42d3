"""GShard's einsum dispatch: token dropping per group of tokens, written as one-hot einsums."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.moe.dispatch.base import drop_stats, register, stats_dict
from moejax.moe.dispatch.capacity import TokenDropping, capacity_slots
from moejax.moe.types import RouterOutput


@register('einsum')
@dataclasses.dataclass(frozen=True)
class EinsumDispatch(TokenDropping):
  """GShard's form: per group of `group_size` tokens, one-hot dispatch and combine tensors
  [G, S, N, C] moved by einsums into [N, G*C, D] expert buffers and back. No gathers or
  scatters, so GSPMD shards it from annotations alone; the dispatch tensors hold
  T * N * C = T * S * K * factor numbers, bounded by the group size, not by the batch."""
  group_size: int = 512

  @classmethod
  def check(cls, config, fail):
    super().check(config, fail)
    g = config.model.moe.dispatch.group_size
    if g < 1:
      fail('model.moe.dispatch.group_size', g, 'must be at least 1')
    tokens = config.train.batch_size * config.data.seq_len
    if tokens % min(g, tokens):
      fail('model.moe.dispatch.group_size', g,
           f'must divide the {tokens} tokens of a batch (train.batch_size * data.seq_len)')

  def __call__(self, x, r: RouterOutput, experts, train: bool):
    t, d = x.shape
    k = r.expert_index.shape[1]
    n = experts.num_experts
    s = min(self.group_size, t)
    if t % s:
      raise ValueError(f'config.model.moe.dispatch.group_size={self.group_size}: must divide '
                       f'the {t} tokens of a batch (batch_size * seq_len); pick a divisor')
    g = t // s
    c = self.capacity(s, k, n, train)
    slots = jax.vmap(lambda e, w: capacity_slots(e, n, c, self.priority, w))(
        r.expert_index.reshape(g, s, k), r.combine_weights.reshape(g, s, k))  # [G, S, K]
    onehot = jax.nn.one_hot(slots, n * c + 1, dtype=x.dtype)[..., :n * c]  # [G, S, K, N*C]
    dispatch = onehot.sum(2).reshape(g, s, n, c)  # [G, S, N, C] (a token fills a slot once)
    weights = r.combine_weights.reshape(g, s, k).astype(x.dtype)
    combine = jnp.einsum('gskm,gsk->gsm', onehot, weights).reshape(g, s, n, c)
    dispatch = nn.with_logical_constraint(dispatch, ('batch', None, 'expert', None))
    buffers = jnp.einsum('gsnc,gsd->ngcd', dispatch, x.reshape(g, s, d))  # [N, G, C, D]
    y_buf = experts.capacity(buffers.reshape(n, g * c, d)).reshape(n, g, c, d)
    y = jnp.einsum('gsnc,ngcd->gsd', combine.astype(y_buf.dtype), y_buf).reshape(t, d)
    return y, stats_dict(drop_stats(slots, n * c, r.expert_index, n))
