"""Dynamic top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts", arXiv:2403.07652).

p = softmax(logits) over the N experts; experts are taken in order of decreasing probability
until their cumulative probability reaches the threshold router.top_p: expert j (the j-th best)
is taken iff the ones before it sum to less than p, so the first always is. The weights are the
probabilities themselves (no renormalisation, as in the paper). A token thus uses 1 .. K experts:
num_experts_per_tok is the most it may use (the static number of slots dispatch shapes need);
its unused slots are null (RouterOutput). Trained with the paper's dynamic loss
(balance.entropy_loss_weight, 1e-4 there) next to the Switch loss.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.moe.routers.base import LearnedRouter, register
from moejax.moe.types import RouterOutput


@register('top_p')
class TopPRouter(LearnedRouter):
  """top_p: the cumulative probability the taken experts reach (at most K of them)."""
  top_p: float = 0.4

  @classmethod
  def check(cls, moe, fail):
    super().check(moe, fail)
    p = moe.router.top_p
    if not 0 < p <= 1:
      fail('model.moe.router.top_p', p, 'must be in (0, 1]')

  @classmethod
  def expected_experts(cls, moe) -> float:
    return float(moe.num_experts_per_tok)  # at most K: an upper bound (the count varies)

  @nn.compact
  def __call__(self, x, token_ids=None, batch: int = 1, train: bool = True, bias=None,
               state=None, replay=None, layer=None) -> RouterOutput:
    del token_ids, batch, bias, state, replay
    n = self.num_experts
    logits = self.logits(x, n, train)  # [T, N]
    probs = jax.nn.softmax(logits, axis=-1)  # [T, N]
    best, top = jax.lax.top_k(jax.lax.stop_gradient(probs), self.k)  # [T, K], decreasing
    before = jnp.cumsum(best, axis=-1) - best  # [T, K] mass of the better experts
    taken = before < self.top_p  # [T, K]; the first slot always
    weights = jnp.where(taken, jnp.take_along_axis(probs, top, -1), 0.0)  # differentiable
    index = jnp.where(taken, top, n).astype(jnp.int32)  # untaken slots are null
    return RouterOutput(expert_index=index, combine_weights=weights, probs=probs, logits=logits)
