"""The MoE FFN: router -> dispatcher -> routed experts, plus always-active shared experts."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.nn import names
from moejax.nn.layers import SwiGLU, param_with_axes
from moejax.moe import balance, default_outputs, losses, registry
from moejax.moe.dispatch.base import no_drops


class MoEFFN(nn.Module):
  """Returns (y [b, s, d], aux) with aux holding this layer's losses and routing statistics."""
  moe: Any  # the model.moe ConfigDict (hashable frozen copy)
  d_model: int
  dtype: Any = jnp.float32
  vocab_size: int = 258

  @nn.compact
  def __call__(self, x, token_ids=None, train: bool = True, replay=None, layer=None):
    """Route, dispatch, combine; add the shared experts.

    Args:
      x: [b, s, d] the normed FFN input.
      token_ids: [b, s] int32 or None (hash routing needs them).
      train: training routing (jitter, noise, expert choice) and balance-state updates.
      replay: [b * s, K] experts to route to (recorded as aux['expert_index'] by an earlier
        pass) instead of selecting; only routers with REPLAY (topk) support it.
      layer: this layer's index in the model, for routers that route by depth.
    Returns:
      (y [b, s, d] in `dtype`, aux): aux['loss'] the weighted balance loss (a scalar), the
      unweighted losses (moe/losses.py), load statistics ('expert_load' [N], 'max_vio', 'cv',
      'router_entropy', 'active_experts', 'active_experts_hist' [K + 1]), drop statistics,
      'expert_index' and 'combine_weights' [b * s, K].
    """
    cfg = self.moe
    b, s, d = x.shape
    n = cfg.num_experts
    tokens = x.reshape(b * s, d)  # [T, D]
    ids = None if token_ids is None else token_ids.reshape(b * s)
    router = registry.make_router(cfg, self.vocab_size)
    state = balance.layer_state(self, router.bias_size(cfg), cfg.balance)
    own = {name: self.variable('moe_state', name, lambda v=value: v).value
           for name, value in router.state_init(cfg).items()}  # the router's own state
    if replay is not None and not router.REPLAY:
      raise ValueError(f'replaying recorded routing needs a router that can replay '
                       f'({", ".join(registry.replaying_routers())}), not {cfg.router.name!r}')
    with jax.named_scope('route'):
      routing = router(tokens, ids, b, train, bias=state.get('bias'), state=own,
                       replay=replay, layer=layer)
    if router.has_variable('params', 'w'):  # losses on the router's weights read it
      routing = routing.replace(router_weight=nn.unbox(router.get_variable('params', 'w')))
    # Null slots (index >= N: zero-computation experts, unused slots) all go to dispatch as N.
    to_dispatch, routed = tokens, routing.replace(
        expert_index=jnp.minimum(routing.expert_index, n))
    if cfg.gate_input and routing.expert_choice is None:
      # The one chosen expert sees gate * x, and its output is added with weight 1.
      to_dispatch = tokens * routing.combine_weights[:, :1].astype(tokens.dtype)
      routed = routed.replace(combine_weights=jnp.ones_like(routing.combine_weights))
    experts = registry.make_experts(cfg, d, self.dtype)
    dispatch = None if router.uses_dispatch(cfg, train) else router.OWN_DISPATCH
    beta = cfg.default_outputs_decay  # Default MoE (moe/default_outputs.py)
    with jax.named_scope('dispatch'):
      if beta and routing.expert_choice is None:
        defaults = self.variable('moe_state', default_outputs.STATE,
                                 lambda: jnp.zeros((n, d), jnp.float32)).value
        y, expert_sums, expert_rows = default_outputs.dispatch(to_dispatch, routed, experts)
        y = y + default_outputs.dense_router_term(routing, defaults, n).astype(y.dtype)
        stats = no_drops()
      else:
        y, stats = registry.make_dispatcher(cfg, dispatch)(to_dispatch, routed, experts, train)
    with jax.named_scope('balance'):
      layer_losses = losses.layer_losses(routing, cfg, b)
      counts = balance.routing_counts(routing, n)
      if train and not self.is_initializing() and self.is_mutable_collection('bias_updates'):
        # Returned, not applied: the train step adds them to the state (MaxText's way).
        deltas = {**balance.state_updates(state, routing, counts, cfg),
                  **router.state_update(own, routing, cfg)}
        if beta and routing.expert_choice is None:
          deltas[default_outputs.STATE] = default_outputs.update(defaults, expert_sums,
                                                                 expert_rows, beta)
        for name, delta in deltas.items():
          self.put_variable('bias_updates', name, delta)
    if routing.passthrough is not None:  # identity experts: gate * the token itself
      y = y + routing.passthrough[:, None].astype(y.dtype) * tokens
    y = y.reshape(b, s, d).astype(self.dtype)
    if cfg.num_shared_experts:
      # The shared experts are fused into one SwiGLU of width shared_expert_ffn_dim (default
      # num_shared * expert width), optionally scaled per token by a sigmoid gate.
      with jax.named_scope('shared_experts'):
        width = cfg.shared_expert_ffn_dim or cfg.num_shared_experts * cfg.expert_ffn_dim
        shared = SwiGLU(width, self.dtype, name=names.SHARED)(x)
        if cfg.shared_expert_gate:
          w = param_with_axes(self, 'shared_gate', (d, 1), ('embed', None))
          shared = shared * jax.nn.sigmoid(x.astype(jnp.float32) @ w).astype(self.dtype)
        y = y + shared
    aux = {
        'loss': losses.weighted_loss(layer_losses, cfg.balance, state),
        **layer_losses,
        **balance.load_stats(counts, routing.probs),
        **balance.active_experts(routing, n),
        **stats,
        'expert_index': routing.expert_index,  # [T, K] the routing, for replay and traces
        'combine_weights': routing.combine_weights,  # [T, K] their gate weights
    }
    return nn.with_logical_constraint(y, ('batch', 'length', 'act_embed')), aux
