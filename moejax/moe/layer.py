"""The MoE FFN: router -> dispatcher -> routed experts, plus always-active shared experts."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from moejax.model.layers import SwiGLU
from moejax.moe import balance, registry
from moejax.moe.experts import RoutedExperts


class MoEFFN(nn.Module):
  """Returns (y [b, s, d], aux) with aux holding this layer's losses and routing statistics."""
  moe: Any  # the model.moe ConfigDict (hashable frozen copy)
  d_model: int
  dtype: Any = jnp.float32

  vocab_size: int = 258

  @nn.compact
  def __call__(self, x, token_ids=None, train: bool = True):
    cfg = self.moe
    b, s, d = x.shape
    n = cfg.num_experts
    tokens = x.reshape(b * s, d)  # [T, D]
    ids = None if token_ids is None else token_ids.reshape(b * s)
    routing = registry.make_router(cfg, self.vocab_size)(tokens, ids, train)
    experts = RoutedExperts(num_experts=n, d_model=d, d_ff=cfg.expert_ffn_dim, dtype=self.dtype,
                            backend=cfg.dispatch.backend, block_size=cfg.dispatch.block_size,
                            name='experts')
    y, dispatch_stats = registry.make_dispatcher(cfg)(tokens, routing, experts, train)
    y = y.reshape(b, s, d).astype(self.dtype)
    if cfg.num_shared_experts:
      # The shared experts are fused into one SwiGLU of width num_shared * expert width.
      y = y + SwiGLU(cfg.num_shared_experts * cfg.expert_ffn_dim, self.dtype, name='shared')(x)
    bal = cfg.balance
    aux_loss = balance.switch_aux_loss(routing, n)
    z_loss = balance.router_z_loss(routing)
    seq_loss = balance.sequence_aux_loss(routing, n, b)
    devices = bal.num_devices or 1
    r = cfg.router
    max_devices = r.topk_groups if r.num_groups > 1 else min(cfg.num_experts_per_tok, devices)
    device_loss = balance.device_balance_loss(routing, n, devices)
    comm_loss = balance.comm_balance_loss(routing, n, devices, max_devices)
    imp_loss = balance.importance_loss(routing, n)
    aux = {
        'loss': (bal.aux_loss_weight * aux_loss + bal.z_loss_weight * z_loss +
                 bal.seq_aux_loss_weight * seq_loss + bal.device_loss_weight * device_loss +
                 bal.comm_loss_weight * comm_loss + bal.importance_loss_weight * imp_loss),
        'aux_loss': aux_loss,
        'z_loss': z_loss,
        'seq_aux_loss': seq_loss,
        'device_loss': device_loss,
        'comm_loss': comm_loss,
        'importance_loss': imp_loss,
        **balance.load_stats(routing, n),
        **dispatch_stats,
    }
    return nn.with_logical_constraint(y, ('batch', 'length', 'act_embed')), aux
