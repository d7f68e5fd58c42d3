"""Token-choice top-K over softmax or sigmoid scores, computed in float32.

score_fn='softmax', norm_topk_prob=False: weights are the softmax over all N experts
  (Switch with K=1, DeepSeek-V1/V2, OLMoE).
score_fn='softmax', norm_topk_prob=True: the K weights renormalised to sum to 1, which equals a
  softmax over the K selected logits (GShard, Mixtral, Qwen3).
score_fn='sigmoid' (DeepSeek-V3): affinities s = sigmoid(logits), selection on s + bias,
  weights s_i / sum_selected s_j, times routed_scaling_factor.
score_fn='sqrtsoftplus' (DeepSeek-V4): affinities s = sqrt(softplus(logits)), used as sigmoid's.
hash_layers = H: the first H layers of the model choose their experts by a fixed token-id ->
  experts table (hash_kind, hash_seed: moe/routers/hashing.py), the weights still those of the
  learned scores at the chosen experts (DeepSeek-V4's hash layers); later layers select top-K.
Group-limited selection (router.num_groups / topk_groups) and the loss-free bias apply to both.
select_on='logits': the K experts are those of the largest logits + bias (the bias added before
  the score function, Kolibri's), the weights still the scores of those experts.

router.null_experts = Z (MoE++, arXiv:2410.07348; the zero-computation experts of
LongCat-Flash): the router scores N + Z experts and picks K of them as usual, but a choice of
expert N + z is a null slot that no dispatcher computes; 'zero' experts add nothing, 'identity'
ones add gate * x (RouterOutput.passthrough). So a token uses 0 .. K real experts, and
balancing all N + Z experts (the aux loss) keeps K N / (N + Z) of them per token on average.
router.null_bias: the selection bias (loss-free balancing) covers the Z null experts too, so
its updates balance all N + Z and steer the real experts per token as the aux loss does
(LongCat-Flash); without it the null experts take no bias.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from moejax.moe.balance import SCORES
from moejax.moe.routers.base import ScoreRouter, register
from moejax.moe.routers.hashing import KINDS as HASH_KINDS, hash_table
from moejax.moe.types import RouterOutput


@register('topk')
class TopKRouter(ScoreRouter):
  """score_fn: 'softmax' or 'sigmoid'; norm_topk_prob: renormalise the K weights to sum to 1;
  routed_scaling_factor: multiplies the weights; null_experts / null_kind: Z zero-computation
  experts ('zero' or 'identity') next to the N routed ones."""
  score_fn: str = 'softmax'
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 1.0
  null_experts: int = 0
  null_kind: str = 'zero'
  null_bias: bool = False
  hash_layers: int = 0
  hash_kind: str = 'random'
  hash_seed: int = 0
  select_on: str = 'scores'

  REPLAY = True
  SCORE_FNS = tuple(SCORES)

  @classmethod
  def check(cls, moe, fail):
    super().check(moe, fail)
    r = moe.router
    if r.score_fn not in cls.SCORE_FNS:
      fail('model.moe.router.score_fn', r.score_fn, f'must be one of {list(cls.SCORE_FNS)}')
    if not r.routed_scaling_factor > 0:
      fail('model.moe.router.routed_scaling_factor', r.routed_scaling_factor,
           'must be a positive number')
    if r.null_experts < 0:
      fail('model.moe.router.null_experts', r.null_experts, 'must be 0 or more')
    if r.null_kind not in ('zero', 'identity'):
      fail('model.moe.router.null_kind', r.null_kind, "must be 'zero' or 'identity'")
    if r.null_experts and r.num_groups > 1:
      fail('model.moe.router.null_experts', r.null_experts,
           'cannot be combined with group-limited routing (router.num_groups > 1)')
    if not (isinstance(r.hash_layers, int) and r.hash_layers >= 0):
      fail('model.moe.router.hash_layers', r.hash_layers, 'must be 0 or more')
    if r.hash_kind not in HASH_KINDS:
      fail('model.moe.router.hash_kind', r.hash_kind, f'must be one of {list(HASH_KINDS)}')
    if r.null_bias and not r.null_experts:
      fail('model.moe.router.null_bias', r.null_bias, 'biases the null experts; set '
           'model.moe.router.null_experts > 0 or leave it False')
    if r.hash_layers and r.null_experts:
      fail('model.moe.router.hash_layers', r.hash_layers, 'cannot be combined with '
           'model.moe.router.null_experts (the table holds real experts)')
    if r.select_on not in ('scores', 'logits'):
      fail('model.moe.router.select_on', r.select_on, "must be 'scores' or 'logits'")
    if r.select_on == 'logits' and r.num_groups > 1:
      fail('model.moe.router.select_on', r.select_on, 'cannot be combined with group-limited '
           "routing (router.num_groups > 1: groups are scored on the scores); use 'scores'")
    if r.null_experts and moe.gate_input:
      fail('model.moe.router.null_experts', r.null_experts,
           'cannot be combined with model.moe.gate_input (the gate scales the input of one '
           'real expert)')

  @classmethod
  def bias_size(cls, moe) -> int:
    """N, or N + Z when the selection bias covers the null experts (null_bias)."""
    r = moe.router
    return moe.num_experts + (r.null_experts if r.null_bias else 0)

  @classmethod
  def expected_experts(cls, moe) -> float:
    """K, of which null experts take their share Z / (N + Z) when balanced."""
    n, z = moe.num_experts, moe.router.null_experts
    return moe.num_experts_per_tok * n / (n + z)

  @nn.compact
  def __call__(self, x, token_ids=None, batch: int = 1, train: bool = True, bias=None,
               state=None, replay=None, layer=None) -> RouterOutput:
    """replay [T, K]: use these experts instead of selecting (recorded from an earlier pass);
    the weights are still computed from this pass's scores, so gradients flow as usual.
    bias [N]: the selection bias (loss-free balancing), added to the scores for selection.
    layer: this layer's index in the model (hash_layers)."""
    del batch, state
    n, z = self.num_experts, self.null_experts
    logits = self.logits(x, n + z, train)  # [T, N + Z]
    scores = SCORES[self.score_fn](logits)  # [T, N + Z]
    # Affinities (not softmax) are normalised for the statistics and losses.
    probs = scores if self.score_fn == 'softmax' else scores / jnp.sum(scores, -1, keepdims=True)
    if bias is not None and bias.shape[0] < n + z:  # null experts without a bias of their own
      bias = jnp.concatenate([bias, jnp.zeros((n + z - bias.shape[0],), bias.dtype)])
    if replay is None:
      index = self.select(logits if self.select_on == 'logits' else scores, bias)  # [T, K]
      if self.hash_layers:
        if token_ids is None or layer is None:
          raise ValueError('router.hash_layers routes by token id in the first layers; the MoE '
                           'layer got no token ids or layer index')
        table = jnp.asarray(hash_table(self.vocab_size, n, self.k, self.hash_kind,
                                       self.hash_seed))
        index = jnp.where(layer < self.hash_layers, table[token_ids], index)
    else:
      index = replay.astype(jnp.int32)
    weights = jnp.take_along_axis(scores, index, axis=-1)  # [T, K]
    if self.norm_topk_prob:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights * self.routed_scaling_factor
    passthrough = None
    if z and self.null_kind == 'identity':
      passthrough = jnp.sum(jnp.where(index >= n, weights, 0.0), axis=-1)  # [T]
    return RouterOutput(expert_index=index, combine_weights=weights, probs=probs, logits=logits,
                        passthrough=passthrough)
