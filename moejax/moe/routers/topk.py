"""Token-choice top-K over softmax or sigmoid scores, computed in float32.

score_fn='softmax', norm_topk_prob=False: weights are the softmax over all N experts
  (Switch with K=1, DeepSeek-V1/V2, OLMoE).
score_fn='softmax', norm_topk_prob=True: the K weights renormalised to sum to 1, which equals a
  softmax over the K selected logits (GShard, Mixtral, Qwen3).
score_fn='sigmoid' (DeepSeek-V3): affinities s = sigmoid(logits), selection on s + bias,
  weights s_i / sum_selected s_j, times routed_scaling_factor.
Group-limited selection (router.num_groups / topk_groups) and the loss-free bias apply to both.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.moe.routers.base import (LOGITS, SELECTION, TOKEN_CHOICE_LOSSES, Router,
                                     check_groups, router_logits, select_experts)
from moejax.moe.types import RouterOutput


class TopKRouter(Router):
  READS = LOGITS + SELECTION + TOKEN_CHOICE_LOSSES + (
      'router.score_fn', 'router.norm_topk_prob', 'router.routed_scaling_factor')
  check = classmethod(lambda cls, moe, fail: check_groups(moe, fail))
  REPLAY = True

  @nn.compact
  def __call__(self, x, token_ids=None, train: bool = True, replay=None,
               bias=None) -> RouterOutput:
    """replay [T, K]: use these experts instead of selecting (recorded from an earlier pass);
    the weights are still computed from this pass's scores, so gradients flow as usual.
    bias [N]: the selection bias (loss-free balancing), added to the scores for selection."""
    del token_ids
    logits = router_logits(self, x, self.num_experts, self.cfg, train)  # [T, N]
    if self.cfg.score_fn == 'sigmoid':
      scores = jax.nn.sigmoid(logits)  # [T, N]
      probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    else:
      scores = probs = jax.nn.softmax(logits, axis=-1)  # [T, N]
    if replay is None:
      index = select_experts(scores, self.k, self.cfg, bias)  # [T, K]
    else:
      index = replay.astype(jnp.int32)
    weights = jnp.take_along_axis(scores, index, axis=-1)  # [T, K]
    if self.cfg.norm_topk_prob:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights * self.cfg.routed_scaling_factor
    return RouterOutput(expert_index=index, combine_weights=weights, probs=probs, logits=logits)
