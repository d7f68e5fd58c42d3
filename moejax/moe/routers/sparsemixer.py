"""SparseMixer routing (GRIN, Liu et al., arXiv:2409.12136; PhiMoE's router): experts chosen
one slot at a time among the ones whose logit is close to the best remaining one.

For slot s (previously chosen experts excluded), with m the best remaining logit:
  an expert stays a candidate iff (m - l_i) / max(|l_i|, m) <= 2 eps;
  weight = softmax over the candidates' logits, at the chosen expert.
Evaluation chooses the best candidate. Training samples one (Gumbel-max over the candidates)
and scales its weight by 1 if it is the best or with probability 1/4, else by 0.3333 (Heun's
third-order estimate of the routing gradient); the backward pass takes the gradient of the
unscaled softmax weight (SparseMixer's straight-through estimate).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.moe.routers.base import LearnedRouter, register
from moejax.moe.types import RouterOutput

HEUN_LOW = 0.3333  # the scale of a sampled non-best expert, as GRIN's code writes 1/3


def sparsemixer_slot(logits, taken, eps: float, key=None):
  """One slot. logits [T, N] float32; taken [T, N] bool (chosen in earlier slots); key: a PRNG
  key to sample (training) or None (the best candidate). Returns (expert [T], weight [T])."""
  remaining = jnp.where(taken, -jnp.inf, logits)
  best = jnp.max(remaining, axis=-1, keepdims=True)  # [T, 1]
  far = jax.lax.stop_gradient(
      (best - logits) / jnp.maximum(jnp.abs(logits), best) > 2 * eps)
  gates = jnp.where(far | taken, -jnp.inf, logits)  # [T, N]
  probs = jax.nn.softmax(gates, axis=-1)
  top = jnp.argmax(remaining, axis=-1)
  if key is None:
    chosen = top
  else:
    gumbel_key, heun_key = jax.random.split(key)
    chosen = jnp.argmax(gates + jax.random.gumbel(gumbel_key, gates.shape), axis=-1)
  weight = jnp.take_along_axis(probs, chosen[:, None], axis=-1)[:, 0]  # [T]
  if key is not None:
    keep = (chosen == jnp.argmax(probs, axis=-1)) | (
        jax.random.uniform(heun_key, chosen.shape) > 0.75)
    scale = jnp.where(keep, 1.0, HEUN_LOW)
    # Forward weight * scale, backward the gradient of weight alone.
    weight = weight + jax.lax.stop_gradient(weight * scale - weight)
  return chosen.astype(jnp.int32), weight


@register('sparsemixer')
class SparseMixerRouter(LearnedRouter):
  """sparsemixer_eps: how close to the best remaining logit a candidate must be (relative,
  2 eps; PhiMoE's router_jitter_noise, 0.01). K slots (PhiMoE: 2), chosen one after another."""
  sparsemixer_eps: float = 0.01

  @classmethod
  def check(cls, moe, fail):
    super().check(moe, fail)
    if not moe.router.sparsemixer_eps > 0:
      fail('model.moe.router.sparsemixer_eps', moe.router.sparsemixer_eps,
           'must be a positive number')

  @nn.compact
  def __call__(self, x, token_ids=None, batch: int = 1, train: bool = True, bias=None,
               state=None, replay=None, layer=None) -> RouterOutput:
    del token_ids, batch, bias, state, replay, layer
    logits = self.logits(x, self.num_experts, train)  # [T, N]
    taken = jnp.zeros(logits.shape, bool)
    index, weights = [], []
    for slot in range(self.k):
      key = jax.random.fold_in(self.make_rng('router'), slot) if train else None
      chosen, weight = sparsemixer_slot(logits, taken, self.sparsemixer_eps, key)
      taken = taken.at[jnp.arange(logits.shape[0]), chosen].set(True)
      index.append(chosen)
      weights.append(weight)
    return RouterOutput(expert_index=jnp.stack(index, -1), combine_weights=jnp.stack(weights, -1),
                        probs=jax.nn.softmax(logits, axis=-1), logits=logits)
