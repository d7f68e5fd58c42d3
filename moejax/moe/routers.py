"""Routers: decide which experts each token goes to and with what weight.

A router maps tokens x [T, D] to a `RouterOutput`. It knows nothing of dispatch (how tokens
reach experts) nor of balance losses (computed from its output by `moe.balance`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from moejax.model.layers import param_with_axes


@struct.dataclass
class RouterOutput:
  expert_index: jax.Array  # [T, K] int32: chosen experts, best first.
  combine_weights: jax.Array  # [T, K] float32: gate weight of each choice.
  probs: jax.Array  # [T, N] float32: router probabilities over all experts (balance losses).
  logits: jax.Array  # [T, N] float32: raw router logits (z-loss).


class TopKRouter(nn.Module):
  """Token-choice top-K over softmax scores, computed in float32.

  norm_topk_prob=False: weights are the softmax over all N experts, unrenormalised
  (DeepSeek-V1/V2, OLMoE). True: the K weights are renormalised to sum to 1, which equals a
  softmax over the K selected logits (GShard, Mixtral, Qwen3).
  """
  num_experts: int
  k: int
  norm_topk_prob: bool = True
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x) -> RouterOutput:
    d = x.shape[-1]
    w = param_with_axes(self, 'w', (d, self.num_experts), ('embed', 'router_expert'))
    dtype = jnp.dtype(self.dtype)
    logits = jnp.dot(x.astype(dtype), w.astype(dtype)).astype(jnp.float32)  # [T, N]
    probs = jax.nn.softmax(logits, axis=-1)  # [T, N]
    weights, index = jax.lax.top_k(probs, self.k)  # [T, K], [T, K]
    if self.norm_topk_prob:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return RouterOutput(expert_index=index.astype(jnp.int32), combine_weights=weights,
                        probs=probs, logits=logits)
