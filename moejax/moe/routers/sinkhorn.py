"""Balanced global assignment by Sinkhorn iterations (Clark et al. 2022, S-BASE; the
"global assignment" family of Lewis et al. 2021, BASE layers).

Selection: top-K of a doubly-normalised score matrix, obtained by alternately normalising
exp(logits) [T, N] so that every token has total mass 1 and every expert total mass T/N. After
enough iterations every expert is wanted by about the same number of tokens, without any
balance loss. Gate weights: the router's own softmax probabilities of the selected experts
(renormalised if norm_topk_prob), so the router still learns from the LM loss.
The assignment is over all tokens of the batch (like expert choice, it is not causal); at
evaluation the router falls back to plain top-K of its probabilities, which is causal.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.moe.routers.base import LearnedRouter, register
from moejax.moe.types import RouterOutput


def sinkhorn(logits, iterations: int):
  """Log-domain Sinkhorn: rows sum to 1, columns to T/N. logits [T, N] -> log plan [T, N]."""
  t, n = logits.shape
  log_p = logits
  for _ in range(iterations):
    log_p = log_p - jax.nn.logsumexp(log_p, axis=0, keepdims=True) + jnp.log(t / n)  # columns
    log_p = log_p - jax.nn.logsumexp(log_p, axis=1, keepdims=True)  # rows
  return log_p


@register('sinkhorn')
class SinkhornRouter(LearnedRouter):
  """sinkhorn_iters: normalisation rounds; norm_topk_prob: renormalise the K weights."""
  sinkhorn_iters: int = 8
  norm_topk_prob: bool = True

  @classmethod
  def check(cls, moe, fail):
    super().check(moe, fail)
    if not moe.router.sinkhorn_iters >= 1:
      fail('model.moe.router.sinkhorn_iters', moe.router.sinkhorn_iters, 'must be at least 1')

  @classmethod
  def causal(cls, moe, train: bool) -> bool:
    return not train  # the balancing iterations mix the whole batch's scores

  @nn.compact
  def __call__(self, x, token_ids=None, batch: int = 1, train: bool = True, bias=None,
               state=None, replay=None, layer=None) -> RouterOutput:
    del token_ids, batch, bias, state, replay
    logits = self.logits(x, self.num_experts, train)  # [T, N]
    probs = jax.nn.softmax(logits, axis=-1)
    choice = sinkhorn(jax.lax.stop_gradient(logits), self.sinkhorn_iters) if train else probs
    _, index = jax.lax.top_k(choice, self.k)  # [T, K]
    weights = jnp.take_along_axis(probs, index, axis=-1)
    if self.norm_topk_prob:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return RouterOutput(expert_index=index.astype(jnp.int32), combine_weights=weights,
                        probs=probs, logits=logits)
