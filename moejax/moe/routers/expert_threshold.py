"""Expert-threshold routing (Sun et al. 2026, "Expert Threshold Routing for Autoregressive
Language Modeling", arXiv:2603.11535): the causal counterpart of expert choice.

Scores p = softmax(x W) [T, N]. Every expert i keeps a threshold tau_i, and a token goes to every
expert whose score exceeds it: p[t, i] > tau_i. The thresholds are layer state, moved by the
train step after each batch toward the score quantile that gives each expert its share of the
global batch: q_i = the (1 - target / N) quantile of p[:, i] over the batch's tokens, so that
`threshold_target` experts per token are used on average, as expert choice with c = target
would take. tau is an exponential moving average of q with decay `threshold_decay`, bias
corrected as Adam's moments are (tau_t = (1 - w_t) tau_{t-1} + w_t q_t, w_t = (1 - beta) /
(1 - beta^t), so tau_1 = q_1); before the first update tau = 0, which lets every expert pass and
the cap decides.

A token's routing depends on its own scores and the thresholds only (never on other tokens of
the batch): causal in training and in decoding, unlike expert choice, yet the number of experts
per token varies and the load balances without an auxiliary loss. Dispatch needs a static
number of slots: a token keeps at most num_experts_per_tok of the experts it passes (those
with the largest margin p - tau); its other slots are null (moe/types.py). Gate weights are the
scores p of the chosen experts (as expert choice), not renormalised.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.moe.routers.base import LearnedRouter, register
from moejax.moe.types import RouterOutput


def threshold_quantiles(probs, target: float):
  """The per-expert score above which a batch's tokens give each expert its share:
  the (1 - target / N) quantile of probs [T, N] over the tokens -> [N]."""
  return jnp.quantile(probs, 1.0 - target / probs.shape[-1], axis=0)


def ema_step(tau, steps, q, decay: float):
  """One bias-corrected EMA step of the thresholds: (new tau [N], new steps)."""
  steps = steps + 1.0
  w = (1.0 - decay) / (1.0 - decay ** steps)
  return (1.0 - w) * tau + w * q, steps


@register('expert_threshold')
class ExpertThresholdRouter(LearnedRouter):
  """threshold_target: the experts a token uses on average, which the thresholds aim at
  (at most num_experts_per_tok, the slots); threshold_decay: the EMA decay of the thresholds."""
  threshold_target: float = 2.0
  threshold_decay: float = 0.99

  @classmethod
  def check(cls, moe, fail):
    super().check(moe, fail)
    r = moe.router
    if not 0 < r.threshold_target <= moe.num_experts_per_tok:
      fail('model.moe.router.threshold_target', r.threshold_target,
           f'the average experts per token must be in (0, num_experts_per_tok='
           f'{moe.num_experts_per_tok}] (the slots; set those to about twice the target)')
    if r.threshold_target >= moe.num_experts:
      fail('model.moe.router.threshold_target', r.threshold_target,
           f'must be below model.moe.num_experts={moe.num_experts}')
    if not 0 <= r.threshold_decay < 1:
      fail('model.moe.router.threshold_decay', r.threshold_decay, 'must be in [0, 1)')

  @classmethod
  def state_init(cls, moe) -> dict:
    return {'threshold': jnp.zeros((moe.num_experts,), jnp.float32),
            'threshold_steps': jnp.zeros((), jnp.float32)}

  @classmethod
  def state_update(cls, state: dict, routing, moe) -> dict:
    r = moe.router
    q = threshold_quantiles(routing.probs, r.threshold_target)
    tau, steps = ema_step(state['threshold'], state['threshold_steps'], q, r.threshold_decay)
    return {'threshold': tau - state['threshold'], 'threshold_steps': steps -
            state['threshold_steps']}

  @classmethod
  def expected_experts(cls, moe) -> float:
    return float(moe.router.threshold_target)

  @nn.compact
  def __call__(self, x, token_ids=None, batch: int = 1, train: bool = True, bias=None,
               state=None, replay=None, layer=None) -> RouterOutput:
    del token_ids, batch, bias, replay
    n = self.num_experts
    tau = state['threshold']  # [N]
    logits = self.logits(x, n, train)  # [T, N]
    probs = jax.nn.softmax(logits, axis=-1)  # [T, N]
    margin = jax.lax.stop_gradient(probs - tau)  # [T, N]
    best, top = jax.lax.top_k(margin, self.k)  # [T, K] the largest margins first
    passed = best > 0  # [T, K]
    weights = jnp.where(passed, jnp.take_along_axis(probs, top, -1), 0.0)  # differentiable
    index = jnp.where(passed, top, n).astype(jnp.int32)  # the rest are null slots
    return RouterOutput(expert_index=index, combine_weights=weights, probs=probs, logits=logits)
