"""ReLU routing (ReMoE: Wang et al. 2024, "ReMoE: Fully Differentiable Mixture-of-Experts with
ReLU Routing", arXiv:2412.14711).

The gates are R = relu(x W) [T, N]: an expert is active for a token iff its gate is positive,
and the output is sum_e R_e * expert_e(x), differentiable in the gates (no top-K cut inside the
gradient). Sparsity is steered by an L1 penalty on R, load-balanced and with an adaptive
coefficient (moe/balance.py: l1_penalty, l1_coef_update; balance.l1_target active experts per
token on average, which sets the target sparsity 1 - l1_target / N).

The number of active experts varies by token; dispatch needs a static number of slots, so a
token keeps at most num_experts_per_tok of its positive gates (the largest; set it above
l1_target, e.g. twice it); its other slots are null. Gates beyond the slots still feel the
penalty, which pushes them to zero.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.moe.routers.base import LearnedRouter, register
from moejax.moe.types import RouterOutput


@register('relu')
class ReLURouter(LearnedRouter):
  """Gates relu(x W): an expert is active iff its gate is positive; at most K per token, the
  rest null slots. Steered to balance.l1_target active experts by the adaptive L1 loss."""
  # The L1 penalty on its gates (balance.l1_target > 0), and the learned routers' own.
  EXTRA_LOSSES = LearnedRouter.EXTRA_LOSSES + ('l1_loss',)

  @classmethod
  def check(cls, moe, fail):
    super().check(moe, fail)
    b = moe.balance
    if not 0 < b.l1_target <= moe.num_experts_per_tok:
      fail('model.moe.balance.l1_target', b.l1_target,
           f'the relu router needs a target of active experts per token in (0, '
           f'num_experts_per_tok={moe.num_experts_per_tok}]')
    if b.l1_init <= 0 or b.l1_growth <= 1:
      fail('model.moe.balance.l1_growth' if b.l1_growth <= 1 else 'model.moe.balance.l1_init',
           b.l1_growth if b.l1_growth <= 1 else b.l1_init,
           'the adaptive L1 coefficient needs l1_init > 0 and l1_growth > 1')

  @classmethod
  def expected_experts(cls, moe) -> float:
    return float(moe.balance.l1_target)  # what the adaptive L1 penalty steers to

  @nn.compact
  def __call__(self, x, token_ids=None, batch: int = 1, train: bool = True, bias=None,
               state=None, replay=None, layer=None) -> RouterOutput:
    del token_ids, batch, bias, state, replay
    n = self.num_experts
    logits = self.logits(x, n, train)  # [T, N]
    gates = jax.nn.relu(logits)  # [T, N]
    _, index = jax.lax.top_k(jax.lax.stop_gradient(gates), self.k)  # [T, K]
    weights = jnp.take_along_axis(gates, index, axis=-1)  # [T, K]
    index = jnp.where(weights > 0, index, n).astype(jnp.int32)  # zero gates: null slots
    # The balance losses' distribution: the gates normalised (uniform where all are zero).
    probs = (gates + 1e-9) / jnp.sum(gates + 1e-9, axis=-1, keepdims=True)
    return RouterOutput(expert_index=index, combine_weights=weights, probs=probs, logits=logits)
