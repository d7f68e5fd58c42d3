"""Dispatchers: carry tokens to the experts a router chose and combine the results.

Every dispatcher has the same call: (x [T, D], routing, experts, train) -> (y [T, D], stats),
where y[t] = sum_k w[t, k] * expert_{e[t, k]}(x[t]) over the choices that were not dropped.
A choice of expert N is a null slot (moe/types.py): it takes no capacity, is neither computed
nor dropped, and adds nothing.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.moe.experts import RoutedExperts
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


def drop_stats(slots, num_slots: int, expert_index, num_experts: int):
  """[dropped fraction of the (token, choice) pairs that chose an expert, fraction of tokens
  that lost every such choice] (null slots are neither)."""
  real = expert_index.reshape(slots.shape) < num_experts  # [T, K] (or [G, S, K])
  dropped = (slots == num_slots) & real
  lost = jnp.any(real, -1) & (jnp.sum(dropped, -1) == jnp.sum(real, -1))
  return jnp.stack([jnp.sum(dropped) / jnp.maximum(jnp.sum(real), 1),
                    jnp.mean(lost.astype(jnp.float32))])


def stats_dict(stats):
  return {'dropped_fraction': stats[0], 'zero_expert_fraction': stats[1]}


class Dispatcher:
  """The contract every dispatcher declares (the registry builds it and derives the config
  checks from it). Its dataclass fields are the config section's (model.moe.dispatch) keyword
  arguments; `READS` adds the fields it reads through the experts (their kernel settings);
  `check(config, fail)` holds its own checks; `causal(moe)` says whether a token's output
  ignores later tokens."""
  READS: tuple = ()

  @classmethod
  def reads(cls) -> tuple:
    return tuple(f'dispatch.{f.name}' for f in dataclasses.fields(cls) if f.init) + cls.READS

  @classmethod
  def check(cls, config, fail):
    """fail(field, value, fix) for a setting this dispatcher cannot work with."""

  @classmethod
  def causal(cls, moe) -> bool:
    del moe
    return True


# The experts' kernel settings, read by the dispatchers that run the grouped experts.
GROUPED_KERNEL = ('experts.backend', 'experts.block_size')


@dataclasses.dataclass(frozen=True)
class TokenDropping(Dispatcher):
  """The settings every capacity-bounded dispatcher shares."""
  capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  min_capacity: int = 4
  priority: str = 'choice'

  @classmethod
  def causal(cls, moe) -> bool:
    # Serving all first choices before second ones, or the highest weights first, lets later
    # tokens take an earlier token's slot; position priority serves tokens in order.
    p = moe.dispatch.priority
    return not (p == 'probability' or (p == 'choice' and moe.num_experts_per_tok > 1))

  def capacity(self, tokens: int, k: int, num_experts: int, train: bool) -> int:
    factor = self.capacity_factor if train else self.eval_capacity_factor
    return expert_capacity(tokens, k, num_experts, factor, self.min_capacity)


@dataclasses.dataclass(frozen=True)
class CapacityDispatch(TokenDropping):
  """Token dropping: each expert takes at most C tokens; the rest pass through the residual."""

  def __call__(self, x, r: RouterOutput, experts: RoutedExperts, train: bool):
    t, d = x.shape
    k = r.expert_index.shape[1]
    n = experts.num_experts
    c = self.capacity(t, k, n, train)
    slots = capacity_slots(r.expert_index, n, c, self.priority, r.combine_weights)  # [T, K]
    buffers = pack_slots(x, slots, n * c).reshape(n, c, d)  # [N, C, D]
    y_buf = experts.capacity(buffers).reshape(n * c, d)
    return (combine_slots(y_buf, slots, r.combine_weights),
            stats_dict(drop_stats(slots, n * c, r.expert_index, n)))


@dataclasses.dataclass(frozen=True)
class EinsumDispatch(TokenDropping):
  """GShard's form: per group of `group_size` tokens, one-hot dispatch and combine tensors
  [G, S, N, C] moved by einsums into [N, G*C, D] expert buffers and back. No gathers or
  scatters, so GSPMD shards it from annotations alone; the dispatch tensors hold
  T * N * C = T * S * K * factor numbers, bounded by the group size, not by the batch."""
  group_size: int = 512

  @classmethod
  def check(cls, config, fail):
    g = config.model.moe.dispatch.group_size
    if g < 1:
      fail('model.moe.dispatch.group_size', g, 'must be at least 1')
    tokens = config.train.batch_size * config.data.seq_len
    if tokens % min(g, tokens):
      fail('model.moe.dispatch.group_size', g,
           f'must divide the {tokens} tokens of a batch (train.batch_size * data.seq_len)')

  def __call__(self, x, r: RouterOutput, experts: RoutedExperts, train: bool):
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


@dataclasses.dataclass(frozen=True)
class DroplessDispatch(Dispatcher):
  """No token is dropped: every (token, choice) pair runs on its expert (experts.dropless)."""
  READS = GROUPED_KERNEL

  def __call__(self, x, r: RouterOutput, experts: RoutedExperts, train: bool):
    del train
    y = experts.dropless(x, r.expert_index, r.combine_weights)
    return y, {'dropped_fraction': jnp.zeros((), jnp.float32),
               'zero_expert_fraction': jnp.zeros((), jnp.float32)}


@dataclasses.dataclass(frozen=True)
class ExpertChoiceDispatch(Dispatcher):
  """Expert choice: expert i processes its C chosen tokens (routing.expert_choice); outputs are
  added back weighted. Never dropless or dropping in the token-choice sense: a token may get
  zero experts (counted as zero_expert_fraction; the residual alone carries it). The
  expert-choice router picks this dispatcher itself (Router.OWN_DISPATCH)."""

  @classmethod
  def check(cls, config, fail):
    fail('model.moe.dispatch.name', 'expert_choice', "is chosen by router.name="
         "'expert_choice' itself; dispatch.name is the dispatcher of its evaluation top-K "
         "(e.g. 'dropless')")

  def __call__(self, x, r: RouterOutput, experts: RoutedExperts, train: bool):
    del train
    t, d = x.shape
    ec = r.expert_choice
    n, c = ec.token_index.shape
    buffers = x[ec.token_index]  # [N, C, D]
    y_buf = experts.capacity(buffers) * ec.weights[..., None].astype(x.dtype)  # [N, C, D]
    with jax.named_scope('combine'):
      y = jnp.zeros((t, d), y_buf.dtype).at[ec.token_index.reshape(-1)].add(
          y_buf.reshape(n * c, d))
    hits = jnp.zeros((t,), jnp.float32).at[ec.token_index.reshape(-1)].add(1.0)
    return y, {'dropped_fraction': jnp.zeros((), jnp.float32),
               'zero_expert_fraction': jnp.mean((hits == 0).astype(jnp.float32))}
