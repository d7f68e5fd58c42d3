"""The routing contract: what a router hands to the dispatchers and the balance strategies.
Routers produce these; dispatch.py, balance.py and the layer read them, and none of them
imports a router."""
from __future__ import annotations

from typing import Any

import jax
from flax import struct


@struct.dataclass
class RouterOutput:
  expert_index: jax.Array  # [T, K] int32: chosen experts, best first.
  combine_weights: jax.Array  # [T, K] float32: gate weight of each choice.
  probs: jax.Array  # [T, N] float32: normalised scores over all experts (balance losses).
  logits: jax.Array  # [T, N] float32: raw router logits (z-loss).
  # Expert-major routing (expert choice): set instead of a fixed K per token.
  expert_choice: Any = None
  # [N] differentiable expected load (noisy top-K in training), for Shazeer's load loss.
  soft_load: Any = None


@struct.dataclass
class ExpertChoice:
  token_index: jax.Array  # [N, C] int32: the tokens each expert took, best first.
  weights: jax.Array  # [N, C] float32: S[token, expert].
