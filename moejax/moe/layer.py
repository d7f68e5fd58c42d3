"""The MoE FFN: router -> dispatcher -> routed experts, plus always-active shared experts."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.nn.layers import SwiGLU, param_with_axes
from moejax.moe import balance, registry


class MoEFFN(nn.Module):
  """Returns (y [b, s, d], aux) with aux holding this layer's losses and routing statistics."""
  moe: Any  # the model.moe ConfigDict (hashable frozen copy)
  d_model: int
  dtype: Any = jnp.float32
  vocab_size: int = 258

  @nn.compact
  def __call__(self, x, token_ids=None, train: bool = True, replay=None):
    """replay [T, K]: route to these experts (recorded as aux['expert_index'] by an earlier
    pass) instead of selecting; only routers with a `replay` argument (topk) support it."""
    cfg = self.moe
    b, s, d = x.shape
    n = cfg.num_experts
    tokens = x.reshape(b * s, d)  # [T, D]
    ids = None if token_ids is None else token_ids.reshape(b * s)
    router = registry.make_router(cfg, self.vocab_size, b)
    bias = balance.selection_bias(self, n, cfg.balance)
    extra = {} if bias is None else {'bias': bias}
    with jax.named_scope('route'):
      if replay is None:
        routing = router(tokens, ids, train, **extra)
      elif router.REPLAY:
        routing = router(tokens, ids, train, replay=replay, **extra)
      else:
        raise ValueError(f'replaying recorded routing needs a router that can replay '
                         f'({", ".join(registry.replaying_routers())}), not {cfg.router.name!r}')
    to_dispatch, routed = tokens, routing
    if cfg.gate_input and routing.expert_choice is None:
      # The one chosen expert sees gate * x, and its output is added with weight 1.
      to_dispatch = tokens * routing.combine_weights[:, :1].astype(tokens.dtype)
      routed = routing.replace(combine_weights=jnp.ones_like(routing.combine_weights))
    experts = registry.make_experts(cfg, d, self.dtype)
    dispatch = None if router.uses_dispatch(cfg, train) else router.OWN_DISPATCH
    with jax.named_scope('dispatch'):
      y, stats = registry.make_dispatcher(cfg, dispatch)(to_dispatch, routed, experts, train)
    if routing.expert_choice is not None:
      # Every expert takes exactly C tokens: the balance losses have nothing to balance.
      losses = {k: jnp.zeros((), jnp.float32) for k in balance.LOSS_WEIGHTS if k != 'z_loss'}
      counts = jnp.full((n,), routing.expert_choice.token_index.shape[1], jnp.float32)
    else:
      with jax.named_scope('balance'):
        losses = balance.token_choice_losses(routing, cfg, b)
        counts = balance.expert_counts(routing.expert_index, n)
        rate = cfg.balance.bias_update_rate
        if (bias is not None and rate > 0 and train and not self.is_initializing() and
            self.is_mutable_collection('bias_updates')):
          # Returned, not applied: the train step adds it to the state (MaxText's way).
          bc = cfg.balance
          if bc.bias_update == 'damped':
            momentum = self.get_variable('moe_state', 'bias_momentum')
            new_bias, new_momentum = balance.damped_update(counts, rate, bias, momentum,
                                                           bc.bias_momentum, bc.bias_clamp)
            self.put_variable('bias_updates', 'bias', new_bias - bias)
            self.put_variable('bias_updates', 'bias_momentum', new_momentum - momentum)
          else:
            self.put_variable('bias_updates', 'bias', balance.bias_update(
                counts, rate, bc.bias_update, bias,
                balance.selection_scores(routing, cfg.router.score_fn),
                cfg.num_experts_per_tok))
    with jax.named_scope('balance'):
      losses['z_loss'] = balance.router_z_loss(routing)
    y = y.reshape(b, s, d).astype(self.dtype)
    if cfg.num_shared_experts:
      # The shared experts are fused into one SwiGLU of width shared_expert_ffn_dim (default
      # num_shared * expert width), optionally scaled per token by a sigmoid gate.
      with jax.named_scope('shared_experts'):
        width = cfg.shared_expert_ffn_dim or cfg.num_shared_experts * cfg.expert_ffn_dim
        shared = SwiGLU(width, self.dtype, name='shared')(x)
        if cfg.shared_expert_gate:
          w = param_with_axes(self, 'shared_gate', (d, 1), ('embed', None))
          shared = shared * jax.nn.sigmoid(x.astype(jnp.float32) @ w).astype(self.dtype)
        y = y + shared
    aux = {
        'loss': sum(cfg.balance[w] * losses[k] for k, w in balance.LOSS_WEIGHTS.items()),
        **losses,
        **balance.load_stats(counts, routing.probs),
        **stats,
        'expert_index': routing.expert_index,  # [T, K] the routing, for replay
    }
    return nn.with_logical_constraint(y, ('batch', 'length', 'act_embed')), aux
