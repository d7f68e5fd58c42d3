"""Balance state and routing statistics: the loss-free selection bias and its update rules,
ReMoE's adaptive L1 coefficient, and the load statistics of a routing. (The balance losses are
the table in moe/losses.py.)

Counts are taken over every token the layer sees in one call. Under jit with a sharded batch
these are global sums (GSPMD inserts the reductions), so statistics do not depend on the mesh.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from moejax.moe.losses import _shares, expert_counts, mean_entropy
from moejax.moe.types import RouterOutput

# The fields of the selection bias (read by the routers that select by score plus a bias).
SELECTION_BIAS_FIELDS = ('balance.bias_update_rate', 'balance.bias_update',
                         'balance.selection_bias', 'balance.bias_momentum', 'balance.bias_clamp')
BIAS_UPDATES = ('sign', 'proportional', 'quantile', 'damped')
LOSS_SCOPES = ('global', 'micro_batch', 'sequence')


def check(moe, fail) -> None:
  """The checks of the balance section's own settings (whichever router reads them)."""
  b = moe.balance
  if b.bias_update not in BIAS_UPDATES:
    fail('model.moe.balance.bias_update', b.bias_update, f'must be one of {list(BIAS_UPDATES)}')
  if not 0 <= b.bias_momentum < 1:
    fail('model.moe.balance.bias_momentum', b.bias_momentum, 'must be in [0, 1)')
  if b.aux_loss_scope not in LOSS_SCOPES:
    fail('model.moe.balance.aux_loss_scope', b.aux_loss_scope,
         f'must be one of {list(LOSS_SCOPES)}')
  if b.num_devices and moe.num_experts % b.num_devices:
    fail('model.moe.balance.num_devices', b.num_devices,
         f'must divide model.moe.num_experts={moe.num_experts}')


def layer_state(module, num_experts: int, balance_cfg) -> dict:
  """The balance state of a MoE layer, in its 'moe_state' collection (checkpointed with the
  train state, no gradient): 'bias', the auxiliary-loss-free selection bias [N] (Wang 2024;
  DeepSeek-V3), added to the scores for selection only; 'bias_momentum' [N] of the damped
  rule; 'l1_coef', the adaptive coefficient of the ReLU router's L1 penalty (ReMoE). The bias
  exists when bias updates are on (balance.bias_update_rate > 0), when balance.selection_bias
  asks for one, or when the state already holds one (e.g. imported); without updates it stays
  fixed."""
  b = balance_cfg
  state = {}
  if b.bias_update_rate > 0 or b.selection_bias or module.has_variable('moe_state', 'bias'):
    state['bias'] = module.variable('moe_state', 'bias',
                                    lambda: jnp.zeros((num_experts,), jnp.float32)).value
    if b.bias_update == 'damped' and b.bias_update_rate > 0:
      state['bias_momentum'] = module.variable(
          'moe_state', 'bias_momentum', lambda: jnp.zeros((num_experts,), jnp.float32)).value
  if b.l1_target > 0:
    state['l1_coef'] = module.variable('moe_state', 'l1_coef',
                                       lambda: jnp.full((), b.l1_init, jnp.float32)).value
  return state


def state_updates(state: dict, routing: RouterOutput, counts, cfg) -> dict:
  """{name: delta} of the layer's balance state after a training step on the whole (global)
  batch; the layer returns them (collection 'bias_updates') and the train step applies them at
  step t + 1 (apply_bias_updates), as MaxText returns its bias updates."""
  b, out = cfg.balance, {}
  if 'bias' in state and b.bias_update_rate > 0:
    bias = state['bias']
    if bias.shape[0] != counts.shape[0]:  # the bias covers zero-computation experts too
      counts = expert_counts(routing.expert_index, bias.shape[0])
    if b.bias_update == 'damped':
      new_bias, new_momentum = damped_update(counts, b.bias_update_rate, bias,
                                             state['bias_momentum'], b.bias_momentum,
                                             b.bias_clamp)
      out['bias'], out['bias_momentum'] = new_bias - bias, new_momentum - state['bias_momentum']
    else:
      out['bias'] = bias_update(counts, b.bias_update_rate, b.bias_update, bias,
                                selection_scores(routing, cfg.router.score_fn, bias.shape[0]),
                                cfg.num_experts_per_tok)
  if 'l1_coef' in state:
    coef = state['l1_coef']
    out['l1_coef'] = l1_coef_update(routing, coef, b.l1_target, b.l1_growth) - coef
  return out


def damped_update(counts, rate: float, bias, momentum, beta: float, clamp: float):
  """'damped' (momentum and soft clamping, in the manner of SMEBU): the proportional step
  g_i = (mean - c_i) / mean is averaged, m <- beta m + (1 - beta) g, and the bias moves by
  u m then is squashed softly into (-clamp, clamp): b <- clamp tanh((b + u m) / clamp)
  (clamp 0: no clamp). Returns (new bias, new momentum)."""
  g = (jnp.mean(counts) - counts) / jnp.mean(counts)
  m = beta * momentum + (1 - beta) * g
  b = bias + rate * m
  return (clamp * jnp.tanh(b / clamp) if clamp > 0 else b), m


# A router's scores of its logits [T, N], by score_fn: softmax, or affinities each in its own
# range (sigmoid; sqrt(softplus), DeepSeek-V4). The selection bias is added to these.
SCORES = {'softmax': lambda logits: jax.nn.softmax(logits, axis=-1),
          'sigmoid': jax.nn.sigmoid,
          'sqrtsoftplus': lambda logits: jnp.sqrt(jax.nn.softplus(logits))}


def selection_scores(r: RouterOutput, score_fn: str, num_experts: int):
  """The scores the bias is added to for selection, of the first num_experts experts (the N
  routed ones, or N + Z when the bias covers zero-computation experts too) [T, num_experts]."""
  return SCORES[score_fn](r.logits)[:, :num_experts]


def bias_update(counts, rate: float, rule: str, bias=None, scores=None, k: int = 1):
  """The step of the selection bias after a training step, from the whole (global) batch.
  'sign': every expert moves toward the mean load, b_i += u * sign(mean - c_i) (counts [N]);
  'proportional': b_i += u * (mean - c_i) / mean;
  'quantile' (quantile balancing, as in Megatron-Core): each expert's threshold tau_i is the
  (1 - K/N) quantile of its scores over the batch's tokens (scores [T, N], before the bias),
  the score above which it would get exactly its share K/N; the bias moves toward
  mean(tau) - tau_i (u = 1: onto it), so experts with high scores everywhere are pulled down.
  The layer returns it (collection 'bias_updates'); the train step applies it at step t + 1
  (apply_bias_updates)."""
  if rule == 'quantile':
    tau = jnp.quantile(scores, 1.0 - k / scores.shape[-1], axis=0)  # [N]
    return rate * ((jnp.mean(tau) - tau) - bias)
  gap = jnp.mean(counts) - counts
  step = jnp.sign(gap) if rule == 'sign' else gap / jnp.mean(counts)
  return rate * step


def apply_bias_updates(model_state: dict, updates: dict) -> dict:
  """model_state with every layer-state entry moved by the update its forward pass returned
  (the selection bias, the routers' own state); entries without an update stay as they are."""
  if not updates.get('bias_updates'):
    return model_state
  return {**model_state, 'moe_state': _add(model_state['moe_state'], updates['bias_updates'])}


def _add(state, deltas):
  """state + deltas on the entries deltas has (nested dicts of arrays)."""
  if not isinstance(state, Mapping):
    return state + deltas
  return {k: _add(v, deltas[k]) if k in deltas else v for k, v in state.items()}


def l1_coef_update(r: RouterOutput, coef, target: float, growth: float):
  """ReMoE's controller of the L1 coefficient: lambda <- lambda * alpha^sign(S* - S), S the
  fraction of zero gates of this batch, S* = 1 - k / N the sparsity of k active experts per
  token: the penalty grows while the routing is denser than the target and shrinks while it
  is sparser."""
  n = r.logits.shape[-1]
  sparsity = jnp.mean((r.logits <= 0).astype(jnp.float32))
  return coef * growth ** jnp.sign((1.0 - target / n) - sparsity)


def routing_counts(routing: RouterOutput, num_experts: int):
  """Tokens each of the N experts got [N] (before any drop); expert choice: exactly C each."""
  if routing.expert_choice is not None:
    return jnp.full((num_experts,), routing.expert_choice.token_index.shape[1], jnp.float32)
  return expert_counts(routing.expert_index, num_experts)


def active_experts(r: RouterOutput, num_experts: int) -> dict:
  """Routed experts per token (null slots left out): the mean and the distribution
  ('active_experts_hist', shares of the tokens using 0, 1, .. K experts; with expert choice,
  0 .. N)."""
  if r.expert_choice is None:
    most = r.expert_index.shape[-1]
    active = jnp.sum((r.expert_index < num_experts).astype(jnp.int32), axis=-1)  # [T]
  else:
    most, t = num_experts, r.probs.shape[0]
    active = jnp.zeros((t,), jnp.int32).at[r.expert_choice.token_index.reshape(-1)].add(1)
  hist = jnp.zeros((most + 1,), jnp.float32).at[active].add(1.0) / active.shape[0]
  return {'active_experts': jnp.mean(active.astype(jnp.float32)), 'active_experts_hist': hist}


def load_stats(counts, probs) -> dict:
  """Statistics of expert counts [N] (routed assignments, before any drop) and probs [T, N]."""
  load = _shares(counts)  # [N] share of routed assignments per expert.
  mean = jnp.maximum(jnp.mean(counts), 1e-9)  # (every slot null: no imbalance to report)
  return {
      'expert_load': load,
      'max_vio': (jnp.max(counts) - jnp.mean(counts)) / mean,
      'cv': jnp.std(counts) / mean,
      'router_entropy': mean_entropy(probs),
  }
