"""Default MoE (Panda et al., arXiv:2504.12463): a dense router gradient at sparse compute.

Each MoE layer keeps, per expert, an exponential moving average of the expert's outputs over
the tokens routed to it ('default_out' [N, D], layer state, no gradient). In the backward pass
every expert a token did not choose contributes its default output weighted by the token's
router probability, so the router's gradient sees all N experts:

  y = sum_{i in TopK} w_i E_i(x) + [sum_{i not in TopK} p_i Ehat_i]  (the bracket: value 0,
                                                                      gradient to p only)

The forward value is the sparse one (the bracket is written t - stop_gradient(t)). After each
training step Ehat_i <- beta Ehat_i + (1 - beta) mean of E_i(x) over the batch's tokens routed
to i (experts that got none keep theirs). Switched on by model.moe.default_outputs_decay = beta
> 0 (the paper's beta: 0.9 to 0.99); it reads each expert's outputs before the gates, so it runs
on the 'dropless' dispatcher (one device, sorted by expert: experts.grouped).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.kernels.grouped import dropless_combine
from moejax.moe.types import RouterOutput

STATE = 'default_out'


def check(moe, fail) -> None:
  beta = moe.default_outputs_decay
  if not 0 <= beta < 1:
    fail('model.moe.default_outputs_decay', beta, 'must be in [0, 1) (0: off)')
  if beta and moe.dispatch.name not in ('dropless', 'auto'):
    fail('model.moe.default_outputs_decay', beta, "reads every expert's outputs before the "
         f"gates: use model.moe.dispatch.name='dropless' (it is {moe.dispatch.name!r})")
  if beta and moe.gate_input:
    fail('model.moe.default_outputs_decay', beta, 'cannot be combined with '
         'model.moe.gate_input (the expert sees the gated token)')


def dispatch(x, r: RouterOutput, experts):
  """Dropless dispatch that also returns each expert's output sum [N, D] and token count [N]."""
  return dropless_combine(x.astype(experts.dtype), r.expert_index, r.combine_weights,
                          experts.num_experts, 0, experts.grouped, expert_sums=True)


def dense_router_term(r: RouterOutput, default_out, num_experts: int):
  """t - stop_gradient(t), t = sum over each token's unchosen experts of p_i Ehat_i [T, D]:
  zero in value, the default outputs' share of the router gradient in the backward pass."""
  probs = r.probs[:, :num_experts]  # [T, N]
  chosen = jnp.zeros_like(probs, bool).at[
      jnp.arange(probs.shape[0])[:, None], r.expert_index].set(True, mode='drop')
  t = jnp.where(chosen, 0.0, probs) @ jax.lax.stop_gradient(default_out)  # [T, D]
  return t - jax.lax.stop_gradient(t)


def update(default_out, sums, counts, beta: float):
  """The EMA step (a delta, added by the train step): experts with tokens move toward their
  batch mean by 1 - beta, the others keep theirs."""
  mean = sums / jnp.maximum(counts, 1)[:, None].astype(sums.dtype)
  step = (1 - beta) * (jax.lax.stop_gradient(mean).astype(jnp.float32) - default_out)
  return jnp.where((counts > 0)[:, None], step, 0.0)
