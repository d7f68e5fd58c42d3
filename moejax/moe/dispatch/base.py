"""What every dispatcher shares: the Dispatcher contract, the registry table it registers into,
and the drop statistics.

Every dispatcher has the same call: (x [T, D], routing, experts, train) -> (y [T, D], stats),
where y[t] = sum_k w[t, k] * expert_{e[t, k]}(x[t]) over the choices that were not dropped.
A choice of expert N is a null slot (moe/types.py): it takes no capacity, is neither computed
nor dropped, and adds nothing. `experts` is the expert block (moe/experts/), whose
capacity / grouped / dropless calls are all a dispatcher makes.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from moejax.moe.table import Table

# config name -> class, filled by @register in each file of this folder.
DISPATCHERS = Table('dispatcher')
register = DISPATCHERS.register

# The experts' kernel settings, read by the dispatchers that run the grouped experts.
GROUPED_KERNEL = ('experts.backend', 'experts.block_size')


class Dispatcher:
  """The contract every dispatcher declares (the registry builds it and derives the config
  checks from it). Its dataclass fields are the config section's (model.moe.dispatch) keyword
  arguments; `READS` adds the fields it reads through the experts (their kernel settings);
  `check(config, fail)` holds its own checks; `causal(moe)` says whether a token's output
  ignores later tokens.

  The call, the same for every dispatcher:
    Args:
      x: [T, D] the tokens.
      routing: RouterOutput, expert_index [T, K] (N for a null slot) and combine_weights
        [T, K] (or expert_choice for the expert-choice dispatcher).
      experts: the expert block (capacity / grouped / dropless calls).
      train: training (capacity factor) or evaluation (eval capacity factor).
    Returns:
      (y [T, D], {'dropped_fraction': scalar, 'zero_expert_fraction': scalar}).
  """
  READS: tuple = ()
  NAME = ''  # set by @register

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


def drop_stats(slots, num_slots: int, expert_index, num_experts: int):
  """[dropped fraction of the (token, choice) pairs that chose an expert, fraction of tokens
  that lost every such choice] (null slots are neither)."""
  real = expert_index.reshape(slots.shape) < num_experts  # [T, K] (or [G, S, K])
  dropped = (slots == num_slots) & real
  lost = jnp.any(real, -1) & (jnp.sum(dropped, -1) == jnp.sum(real, -1))
  return jnp.stack([jnp.sum(dropped) / jnp.maximum(jnp.sum(real), 1),
                    jnp.mean(lost.astype(jnp.float32))])


def stats_dict(stats):
  """drop_stats' [2] vector -> the dispatcher's stats dict."""
  return {'dropped_fraction': stats[0], 'zero_expert_fraction': stats[1]}


def no_drops() -> dict:
  """The stats of a dispatcher that never drops."""
  return {'dropped_fraction': jnp.zeros((), jnp.float32),
          'zero_expert_fraction': jnp.zeros((), jnp.float32)}
