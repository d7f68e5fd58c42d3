"""Token dropping: each expert takes at most C = ceil(capacity_factor * K * T / N) tokens in
buffers [N, C, D]; the choices beyond C are dropped (their contribution is zero and the residual
carries the token). The slot arithmetic here is shared by the einsum and all-to-all paths.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from moejax.moe.dispatch.base import Dispatcher, drop_stats, register, stats_dict
from moejax.moe.types import RouterOutput


def expert_capacity(num_tokens: int, k: int, num_experts: int, factor: float,
                    min_capacity: int) -> int:
  """C = ceil(factor * K * T / N) (K included, as MaxText), at least min_capacity, at most T."""
  c = max(min_capacity, math.ceil(factor * k * num_tokens / num_experts))
  return min(c, num_tokens)


def capacity_slots(expert_index, num_experts: int, capacity: int, priority: str,
                   weights=None):
  """Slot e*C + position of each (token, choice) in its expert's buffer; N*C where dropped
  or null (expert N: served after every real choice, so it takes no place).

  priority 'choice' serves every token's first choice before any second choice (flaxformer);
  'position' serves tokens in sequence order, all choices of a token together; 'probability'
  serves (token, choice) pairs by decreasing router weight `weights` [T, K] (V-MoE's batch
  prioritized routing, over pairs), ties in sequence order.
  """
  t, k = expert_index.shape
  pairs = jnp.arange(t * k, dtype=jnp.int32)  # token-major pair ids t*K + k
  if priority == 'position':
    serve = pairs
  elif priority == 'choice':
    serve = pairs.reshape(t, k).T.reshape(-1)
  elif priority == 'probability':
    serve = jnp.argsort(-weights.reshape(-1).astype(jnp.float32), stable=True).astype(jnp.int32)
  else:
    raise ValueError(f'priority {priority!r}')
  flat = expert_index.reshape(-1)[serve]  # [T*K] experts in serving order
  order = jnp.argsort(flat, stable=True)  # stable: equal experts keep serving order
  counts = jnp.zeros((num_experts + 1,), jnp.int32).at[flat].add(1)  # [N + 1]: null last
  starts = jnp.cumsum(counts) - counts
  rank = jnp.arange(t * k, dtype=jnp.int32) - starts[flat[order]]
  position = jnp.zeros((t * k,), jnp.int32).at[order].set(rank)  # [T*K] in serving order
  kept = (position < capacity) & (flat < num_experts)
  slots = jnp.where(kept, flat * capacity + position, num_experts * capacity)
  return jnp.zeros((t * k,), jnp.int32).at[serve].set(slots).reshape(t, k)  # [T, K]


def pack_slots(x, slots, num_slots: int):
  """x [T, D], slots [T, K] -> the [num_slots, D] buffer rows (zeros where a slot is empty)."""
  t, k = slots.shape
  token_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, k))
  # Which token fills each slot (T: an empty slot, reads the zero row).
  slot_token = jnp.full((num_slots + 1,), t, jnp.int32).at[slots.reshape(-1)].set(
      token_ids.reshape(-1))[:num_slots]  # [num_slots]
  return jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])[slot_token]


@jax.named_scope('combine')
def combine_slots(y_buf, slots, weights):
  """y_buf [num_slots, D] -> y [T, D] = sum_k w[t, k] * y_buf[slots[t, k]] (0 if dropped)."""
  y_pad = jnp.concatenate([y_buf, jnp.zeros((1, y_buf.shape[1]), y_buf.dtype)])
  return jnp.einsum('tkd,tk->td', y_pad[slots], weights.astype(y_pad.dtype))


@dataclasses.dataclass(frozen=True)
class TokenDropping(Dispatcher):
  """The settings every capacity-bounded dispatcher shares."""
  capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  min_capacity: int = 4
  priority: str = 'choice'

  PRIORITIES = ('choice', 'position', 'probability')

  @classmethod
  def check(cls, config, fail):
    d = config.model.moe.dispatch
    for field in ('capacity_factor', 'eval_capacity_factor'):
      if not d[field] > 0:
        fail(f'model.moe.dispatch.{field}', d[field], 'must be a positive number')
    if not d.min_capacity >= 0:
      fail('model.moe.dispatch.min_capacity', d.min_capacity, 'must be >= 0')
    if d.priority not in cls.PRIORITIES:
      fail('model.moe.dispatch.priority', d.priority, f'must be one of {list(cls.PRIORITIES)}')

  @classmethod
  def causal(cls, moe) -> bool:
    # Serving all first choices before second ones, or the highest weights first, lets later
    # tokens take an earlier token's slot; position priority serves tokens in order.
    p = moe.dispatch.priority
    return not (p == 'probability' or (p == 'choice' and moe.num_experts_per_tok > 1))

  def capacity(self, tokens: int, k: int, num_experts: int, train: bool) -> int:
    factor = self.capacity_factor if train else self.eval_capacity_factor
    return expert_capacity(tokens, k, num_experts, factor, self.min_capacity)


@register('capacity')
@dataclasses.dataclass(frozen=True)
class CapacityDispatch(TokenDropping):
  """Token dropping: each expert takes at most C tokens; the rest pass through the residual."""

  def __call__(self, x, r: RouterOutput, experts, train: bool):
    t, d = x.shape
    k = r.expert_index.shape[1]
    n = experts.num_experts
    c = self.capacity(t, k, n, train)
    slots = capacity_slots(r.expert_index, n, c, self.priority, r.combine_weights)  # [T, K]
    buffers = pack_slots(x, slots, n * c).reshape(n, c, d)  # [N, C, D]
    y_buf = experts.capacity(buffers).reshape(n * c, d)
    return (combine_slots(y_buf, slots, r.combine_weights),
            stats_dict(drop_stats(slots, n * c, r.expert_index, n)))
