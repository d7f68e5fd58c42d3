"""Expert choice routing (Zhou et al. 2022, arXiv:2202.09368).

S = softmax(x W) over experts [T, N]; inside each routing scope every expert takes its top
C = ceil(T_scope * c / N) tokens (c = router.ec_capacity_factor, 2 by default) with gate
weight S[t, i]. Every expert gets exactly C tokens; a token may get zero or several experts.

Leakage: a token's routing depends on the other tokens of its scope, future ones included, so
on a causal LM the training loss can use information from the future (the smaller the scope,
the stronger the effect), and decoding one token at a time cannot reproduce it. Scopes:
'batch' (all tokens of the batch) or 'sequence' (each sequence separately). At evaluation,
router.ec_eval='topk' (the default) routes causally: token-choice top-K of the same scores,
K = round(c); 'expert_choice' keeps the non-causal routing. The training loop logs which one
ran as eval/routing_causal, so no comparison silently benefits from leakage.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.moe.routers.base import LearnedRouter, register
from moejax.moe.types import ExpertChoice, RouterOutput


def expert_choice_capacity(tokens_in_scope: int, num_experts: int, factor: float) -> int:
  """C = ceil(T_scope * c / N), at least 1 and at most T_scope."""
  return min(tokens_in_scope, max(1, math.ceil(tokens_in_scope * factor / num_experts)))


@register('expert_choice')
class ExpertChoiceRouter(LearnedRouter):
  """ec_capacity_factor: c, each expert takes C = T_scope * c / N tokens; ec_scope: 'batch' or
  'sequence'; ec_eval: 'topk' (causal evaluation, K = round(c)) or 'expert_choice' (leaks)."""
  ec_capacity_factor: float = 2.0
  ec_scope: str = 'batch'
  ec_eval: str = 'topk'

  # C does K's job; every expert takes exactly C tokens, so of the balance losses only the
  # z-loss trains anything. (At evaluation with ec_eval='topk' the routing is token choice,
  # through the dispatcher, K = round(c).)
  USES_K = False
  LOSSES = ('z_loss',)
  OWN_DISPATCH = 'expert_choice'
  SCOPES = ('batch', 'sequence')
  EVALS = ('topk', 'expert_choice')

  @classmethod
  def check(cls, moe, fail):
    super().check(moe, fail)
    r = moe.router
    if not r.ec_capacity_factor > 0:
      fail('model.moe.router.ec_capacity_factor', r.ec_capacity_factor,
           'must be a positive number')
    if r.ec_scope not in cls.SCOPES:
      fail('model.moe.router.ec_scope', r.ec_scope, f'must be one of {list(cls.SCOPES)}')
    if r.ec_eval not in cls.EVALS:
      fail('model.moe.router.ec_eval', r.ec_eval, f'must be one of {list(cls.EVALS)}')

  @classmethod
  def expected_experts(cls, moe) -> float:
    return float(moe.router.ec_capacity_factor)  # N experts x C = T c / N tokens: c per token

  @classmethod
  def causal(cls, moe, train: bool) -> bool:
    return not (train or moe.router.ec_eval == 'expert_choice')

  @classmethod
  def uses_dispatch(cls, moe, train: bool) -> bool:
    return not train and moe.router.ec_eval == 'topk'

  @nn.compact
  def __call__(self, x, token_ids=None, batch: int = 1, train: bool = True, bias=None,
               state=None, replay=None, layer=None) -> RouterOutput:
    """batch: the sequences in the call (the 'sequence' scope routes each on its own)."""
    del token_ids, bias, state, replay
    n, c = self.num_experts, self.ec_capacity_factor
    logits = self.logits(x, n, train)  # [T, N]
    probs = jax.nn.softmax(logits, axis=-1)  # [T, N]
    if not train and self.ec_eval == 'topk':
      k = max(1, round(c))
      weights, index = jax.lax.top_k(probs, k)
      return RouterOutput(index.astype(jnp.int32), weights, probs, logits)
    t = x.shape[0]
    scopes = batch if self.ec_scope == 'sequence' else 1
    per_scope = t // scopes
    cap = expert_choice_capacity(per_scope, n, c)
    scores = probs.reshape(scopes, per_scope, n).transpose(0, 2, 1)  # [scopes, N, T_scope]
    w, idx = jax.lax.top_k(scores, cap)  # [scopes, N, C]
    idx = idx + (jnp.arange(scopes) * per_scope)[:, None, None]
    ec = ExpertChoice(token_index=idx.transpose(1, 0, 2).reshape(n, scopes * cap).astype(jnp.int32),
                      weights=w.transpose(1, 0, 2).reshape(n, scopes * cap))
    # Token-major view for statistics: which experts each token got is not fixed-size, so
    # expert_index/combine_weights stay empty ([T, 0]) and the layer reads `expert_choice`.
    empty = jnp.zeros((t, 0), jnp.int32)
    return RouterOutput(empty, jnp.zeros((t, 0)), probs, logits, expert_choice=ec)
