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

from moejax.moe.routers.base import LOGITS, Router, router_logits
from moejax.moe.types import ExpertChoice, RouterOutput


def expert_choice_capacity(tokens_in_scope: int, num_experts: int, factor: float) -> int:
  return min(tokens_in_scope, max(1, math.ceil(tokens_in_scope * factor / num_experts)))


class ExpertChoiceRouter(Router):
  batch: int = 1  # sequences in the call (for the per-sequence scope)

  # C does K's job; every expert takes exactly C tokens, so of the balance losses only the
  # z-loss trains anything. (At evaluation with ec_eval='topk' the routing is token choice,
  # through the dispatcher, K = round(c).)
  READS = LOGITS + ('router.ec_capacity_factor', 'router.ec_scope', 'router.ec_eval',
                    'balance.z_loss_weight')
  OWN_DISPATCH = 'expert_choice'

  @classmethod
  def causal(cls, moe, train: bool) -> bool:
    return not (train or moe.router.ec_eval == 'expert_choice')

  @classmethod
  def uses_dispatch(cls, moe, train: bool) -> bool:
    return not train and moe.router.ec_eval == 'topk'

  @nn.compact
  def __call__(self, x, token_ids=None, train: bool = True) -> RouterOutput:
    del token_ids
    n, c = self.num_experts, self.cfg.ec_capacity_factor
    logits = router_logits(self, x, n, self.cfg, train)  # [T, N]
    probs = jax.nn.softmax(logits, axis=-1)  # [T, N]
    if not train and self.cfg.ec_eval == 'topk':
      k = max(1, round(c))
      weights, index = jax.lax.top_k(probs, k)
      return RouterOutput(index.astype(jnp.int32), weights, probs, logits)
    t = x.shape[0]
    scopes = self.batch if self.cfg.ec_scope == 'sequence' else 1
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
