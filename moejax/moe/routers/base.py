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
from moejax.nn.layers import param_with_axes


# The config fields (under model.moe) a router reads, by what reads them.
LOGITS = ('router.dtype', 'router.jitter', 'router.freeze')  # router_logits
SELECTION = ('num_experts_per_tok', 'router.num_groups', 'router.topk_groups',
             'router.group_score', 'balance.bias_update_rate', 'balance.bias_update',
             'balance.selection_bias', 'balance.bias_momentum', 'balance.bias_clamp')
# The MoE layer's balance losses of a token-choice routing (moe/layer.py).
TOKEN_CHOICE_LOSSES = ('balance.aux_loss_weight', 'balance.aux_loss_scope',
                       'balance.z_loss_weight', 'balance.seq_aux_loss_weight',
                       'balance.device_loss_weight',
                       'balance.comm_loss_weight', 'balance.num_devices',
                       'balance.importance_loss_weight', 'balance.load_loss_weight',
                       'balance.entropy_loss_weight')


class Router(nn.Module):
  """Common fields: N experts, K per token, the router's config section. (The selection bias
  of loss-free balancing is the balance strategy's, moe/balance.py; routers that select by
  score take it as the call's `bias` argument.)

  The contract every router class declares (the registry derives the config checks from it):
  `reads(moe)`, the fields under model.moe it reads (any other field set away from its
  default is refused, naming the router); `check(moe, fail)`, its own checks;
  `causal(moe, train)`, whether a token's routing ignores later tokens; and
  `uses_dispatch(moe, train)`, whether its routing goes through the configured dispatcher,
  and if not, `OWN_DISPATCH`, the registry name of the dispatcher it goes through instead;
  `REPLAY`, whether its call takes `replay` (route as recorded in an earlier pass).
  """
  num_experts: int
  k: int
  cfg: Any  # model.moe.router

  READS = LOGITS + SELECTION + TOKEN_CHOICE_LOSSES
  REPLAY = False
  OWN_DISPATCH = None

  @classmethod
  def reads(cls, moe) -> tuple:
    del moe
    return cls.READS

  @classmethod
  def check(cls, moe, fail):
    """fail(field, value, fix) for a setting this router cannot work with."""

  @classmethod
  def causal(cls, moe, train: bool) -> bool:
    del moe, train
    return True

  @classmethod
  def uses_dispatch(cls, moe, train: bool) -> bool:
    del moe, train
    return True


def check_groups(moe, fail):
  """The checks of group-limited selection (routers that read SELECTION)."""
  r, n = moe.router, moe.num_experts
  if n % r.num_groups:
    fail('model.moe.router.num_groups', r.num_groups, f'must divide model.moe.num_experts={n}')
  if r.topk_groups > r.num_groups:
    fail('model.moe.router.topk_groups', r.topk_groups,
         f'cannot exceed model.moe.router.num_groups={r.num_groups}')
  reachable = r.topk_groups * n // r.num_groups
  if r.num_groups > 1 and moe.num_experts_per_tok > reachable:
    fail('model.moe.router.topk_groups', r.topk_groups,
         f'the kept groups hold {reachable} experts, fewer than num_experts_per_tok='
         f'{moe.num_experts_per_tok}; keep more groups')
  if r.num_groups > 1 and n // r.num_groups < 2 and resolve_group_score(r) == 'top2_sum':
    fail('model.moe.router.group_score', r.group_score,
         "'top2_sum' needs at least 2 experts per group; use 'max' or fewer groups")


def resolve_group_score(cfg) -> str:
  """'auto': 'top2_sum' (DeepSeek-V3) for sigmoid scores, else 'max' (DeepSeek-V2)."""
  if cfg.group_score == 'auto':
    return 'top2_sum' if cfg.score_fn == 'sigmoid' else 'max'
  return cfg.group_score


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


def select_experts(scores, k: int, cfg, bias=None):
  """Top-K of (scores + selection bias [N]) after group limiting; returns index [T, K]. The
  bias (the loss-free balancing state, moe/balance.py) changes selection only."""
  choice = scores if bias is None else scores + bias
  choice = group_limited(choice, cfg.num_groups, cfg.topk_groups, resolve_group_score(cfg))
  _, index = jax.lax.top_k(jax.lax.stop_gradient(choice), k)  # [T, K]
  return index.astype(jnp.int32)
