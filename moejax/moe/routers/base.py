"""What every router shares: its output type, float32 logits, group-limited selection, and the
auxiliary-loss-free selection bias.

A router maps tokens x [T, D] (and their token ids [T]) to a `RouterOutput`. It knows nothing
of dispatch (how tokens reach experts); balance losses are computed from its output by
`moe.balance`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from moejax.model.layers import param_with_axes


@struct.dataclass
class RouterOutput:
  expert_index: jax.Array  # [T, K] int32: chosen experts, best first.
  combine_weights: jax.Array  # [T, K] float32: gate weight of each choice.
  probs: jax.Array  # [T, N] float32: normalised scores over all experts (balance losses).
  logits: jax.Array  # [T, N] float32: raw router logits (z-loss).
  # Expert-major routing (expert choice): set instead of a fixed K per token.
  expert_choice: Any = None
  # [N] differentiable expected load (noisy top-K in training), for Shazeer's load loss.
  soft_load: Any = None


class Router(nn.Module):
  """Common fields: N experts, K per token, the router and balance config sections."""
  num_experts: int
  k: int
  cfg: Any  # model.moe.router
  balance: Any  # model.moe.balance


def router_logits(module: nn.Module, x, num_experts: int, cfg, train: bool):
  """x [T, D] -> logits [T, N] in float32 (router.dtype for the matmul, float32 by default).

  router.jitter (Switch): multiply the router input by U(1 - eps, 1 + eps) while training.
  router.freeze: no gradient reaches the router weights (the optimizer also skips them).
  """
  w = param_with_axes(module, 'w', (x.shape[-1], num_experts), ('embed', 'router_expert'))
  dtype = jnp.dtype(cfg.dtype)
  x = x.astype(dtype)
  if train and cfg.jitter > 0:
    eps = cfg.jitter
    x = x * jax.random.uniform(module.make_rng('router'), x.shape, dtype, 1 - eps, 1 + eps)
  if cfg.freeze:
    w = jax.lax.stop_gradient(w)
  return jnp.dot(x, w.astype(dtype)).astype(jnp.float32)


def group_limited(choice, num_groups: int, topk_groups: int, group_score: str):
  """Keep the experts of the best `topk_groups` of `num_groups` groups; mask the rest with -inf.

  group_score 'top2_sum' (DeepSeek-V3): a group's score is the sum of its two best scores.
  'max' (DeepSeek-V2 device-limited routing): its best score.
  """
  if num_groups <= 1 or topk_groups >= num_groups:
    return choice
  t, n = choice.shape
  grouped = choice.reshape(t, num_groups, n // num_groups)  # [T, G, N/G]
  if group_score == 'top2_sum':
    score = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [T, G]
  else:
    score = jnp.max(grouped, axis=-1)  # [T, G]
  _, keep = jax.lax.top_k(score, topk_groups)  # [T, M]
  kept = jnp.zeros((t, num_groups), bool).at[jnp.arange(t)[:, None], keep].set(True)
  return jnp.where(kept[:, :, None], grouped, -jnp.inf).reshape(t, n)


def select_experts(module: nn.Module, scores, k: int, cfg, balance_cfg, train: bool):
  """Top-K of (scores + bias) after group limiting; returns index [T, K].

  The bias is the auxiliary-loss-free balancing state (Wang 2024; DeepSeek-V3): it lives in
  the 'moe_state' collection, changes selection only (never the gate weights), gets no
  gradient, and after each training step moves every expert toward the mean load computed
  over the whole (global) batch: b_i += u * sign(mean - c_i), or, 'proportional',
  b_i += u * (mean - c_i) / mean.
  """
  n = scores.shape[-1]
  choice = scores
  rate = balance_cfg.bias_update_rate
  if rate > 0:
    bias = module.variable('moe_state', 'bias', lambda: jnp.zeros((n,), jnp.float32))
    choice = scores + bias.value
  group_score = cfg.group_score
  if group_score == 'auto':
    group_score = 'top2_sum' if cfg.score_fn == 'sigmoid' else 'max'
  choice = group_limited(choice, cfg.num_groups, cfg.topk_groups, group_score)
  _, index = jax.lax.top_k(jax.lax.stop_gradient(choice), k)  # [T, K]
  if rate > 0 and train and not module.is_initializing():
    counts = jnp.zeros((n,), jnp.float32).at[index.reshape(-1)].add(1.0)
    gap = jnp.mean(counts) - counts
    step = jnp.sign(gap) if balance_cfg.bias_update == 'sign' else gap / jnp.mean(counts)
    bias.value = bias.value + rate * step
  return index.astype(jnp.int32)
