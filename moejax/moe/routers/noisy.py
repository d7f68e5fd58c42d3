"""Noisy top-K gating (Shazeer et al. 2017, arXiv:1701.06538).

H = x W_g + N(0, 1) * softplus(x W_noise) while training (no noise at evaluation); keep the
top K of H and softmax over those K. The noise scale is learned per token and expert.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.stats  # noqa: F401  (norm.cdf)
from flax import linen as nn

from moejax.moe.routers.base import ScoreRouter, register
from moejax.moe.types import RouterOutput
from moejax.nn.layers import param_with_axes


@register('noisy_topk')
class NoisyTopKRouter(ScoreRouter):
  """Top-K of the logits plus learned Gaussian noise while training; the K kept are weighted
  by a softmax over them. Its probabilities for the balance losses are softmax(noisy logits),
  and in training it offers Shazeer's smooth load (RouterOutput.soft_load)."""

  @nn.compact
  def __call__(self, x, token_ids=None, batch: int = 1, train: bool = True, bias=None,
               state=None, replay=None, layer=None) -> RouterOutput:
    del token_ids, batch, state, replay
    logits = self.logits(x, self.num_experts, train)  # [T, N] clean
    w_noise = param_with_axes(self, 'w_noise', (x.shape[-1], self.num_experts),
                              ('embed', 'router_expert'), nn.initializers.zeros)
    h = logits
    if train:
      scale = jax.nn.softplus(jnp.dot(x.astype(jnp.float32), w_noise))  # [T, N]
      h = logits + jax.random.normal(self.make_rng('router'), logits.shape) * scale
    index = self.select(h, bias)  # [T, K]
    weights = jax.nn.softmax(jnp.take_along_axis(h, index, axis=-1), axis=-1)  # [T, K]
    soft_load = None
    if train and self.k < self.num_experts:
      soft_load = smooth_load(logits, h, scale, self.k)
    return RouterOutput(expert_index=index, combine_weights=weights,
                        probs=jax.nn.softmax(h, axis=-1), logits=logits, soft_load=soft_load)


def smooth_load(clean, noisy, noise_std, k: int):
  """Shazeer 2017's differentiable load: sum_t P(x_t, i), the probability that expert i stays
  in the top K if only its own noise is redrawn: Phi((clean_i - kth_excluding_i) / std_i),
  where kth_excluding_i is the K-th best noisy score of the other experts."""
  top, _ = jax.lax.top_k(noisy, k + 1)  # [T, K+1]
  in_topk = noisy >= top[:, k - 1:k]  # [T, N]
  threshold = jnp.where(in_topk, top[:, k:k + 1], top[:, k - 1:k])  # [T, N]
  z = (clean - jax.lax.stop_gradient(threshold)) / (noise_std + 1e-9)
  return jnp.sum(jax.scipy.stats.norm.cdf(z), axis=0)  # [N]
