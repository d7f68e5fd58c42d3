"""The routing contract: what a router hands to the dispatchers and the balance strategies.
Routers produce these; dispatch.py, balance.py and the layer read them, and none of them
imports a router.

Null slots. A token has K routing slots, but a slot need not hold a routed expert: an
`expert_index` of N or more (N = the routed experts) is a null slot, which no dispatcher
computes, stores, sends or counts against a capacity, and whose output is zero. Routers with a
variable number of experts per token leave their unused slots null (index N, weight 0: top-p,
ReLU routing), and zero-computation experts (MoE++) are null slots with a weight (index N + z).
`passthrough` [T] adds passthrough[t] * x[t] to the output (identity experts).
"""
from __future__ import annotations

from typing import Any

import jax
from flax import struct


@struct.dataclass
class RouterOutput:
  """What a router hands to the dispatchers and the balance losses (shapes per field)."""
  expert_index: jax.Array  # [T, K] int32: chosen experts, best first; >= N: a null slot.
  combine_weights: jax.Array  # [T, K] float32: gate weight of each choice.
  # [T, N + Z] float32: normalised scores over all the router's experts, Z zero-computation
  # ones included (the balance losses balance all of them).
  probs: jax.Array
  logits: jax.Array  # [T, N + Z] float32: raw router logits (z-loss).
  # Expert-major routing (expert choice): set instead of a fixed K per token.
  expert_choice: Any = None
  # [N] differentiable expected load (noisy top-K in training), for Shazeer's load loss.
  soft_load: Any = None
  # [T] float32 weight of the token itself in the output (identity experts), or None.
  passthrough: Any = None
  # [D, N + Z] float32: a learned router's weight matrix (losses on the router itself), set by
  # the layer; None for routers without one.
  router_weight: Any = None


def active_slots(expert_index, num_experts: int):
  """[T, K] bool: the slots that hold a routed expert (not null)."""
  return expert_index < num_experts


@struct.dataclass
class ExpertChoice:
  """Expert-major routing: the C tokens each expert took, and their weights."""
  token_index: jax.Array  # [N, C] int32: the tokens each expert took, best first.
  weights: jax.Array  # [N, C] float32: S[token, expert].
