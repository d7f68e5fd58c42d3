"""Balance in one room: the balance losses and their weights, the loss-free selection bias
and its update, and the routing statistics, computed from a RouterOutput.

Counts are taken over every token the layer sees in one call. Under jit with a sharded batch
these are global sums (GSPMD inserts the reductions), so statistics do not depend on the mesh.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.moe.types import RouterOutput


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
    if b.bias_update == 'damped':
      new_bias, new_momentum = damped_update(counts, b.bias_update_rate, bias,
                                             state['bias_momentum'], b.bias_momentum,
                                             b.bias_clamp)
      out['bias'], out['bias_momentum'] = new_bias - bias, new_momentum - state['bias_momentum']
    else:
      out['bias'] = bias_update(counts, b.bias_update_rate, b.bias_update, bias,
                                selection_scores(routing, cfg.router.score_fn, cfg.num_experts),
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


def selection_scores(r: RouterOutput, score_fn: str, num_experts: int):
  """The scores the bias [N] is added to for selection: sigmoid or softmax of the logits, of
  the N routed experts [T, N] (a router's zero-computation experts take no bias)."""
  scores = jax.nn.sigmoid(r.logits) if score_fn == 'sigmoid' else jax.nn.softmax(r.logits, -1)
  return scores[:, :num_experts]


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
  """model_state with every layer's bias moved by the update its forward pass returned."""
  if not updates.get('bias_updates'):
    return model_state
  return {**model_state, 'moe_state': jax.tree.map(jnp.add, model_state['moe_state'],
                                                   updates['bias_updates'])}


def expert_counts(expert_index, num_experts: int):
  """Tokens routed to each expert [num_experts] float32 (before any capacity drop). Slots whose
  index is num_experts or more (null slots, or experts beyond those counted) count nowhere."""
  return jnp.zeros((num_experts,), jnp.float32).at[expert_index.reshape(-1)].add(1.0,
                                                                                 mode='drop')


def group_counts(expert_index, num_experts: int, groups: int):
  """expert_counts of each of `groups` equal, consecutive slices of the tokens: [G, N]."""
  index = expert_index.reshape(groups, -1)
  return jax.vmap(lambda i: expert_counts(i, num_experts))(index)


def _shares(counts):
  """counts [..., N] -> each expert's share of the routed slots (K T of them with K fixed;
  fewer with null slots), summing to 1 (0 where nothing was routed)."""
  return counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)


def switch_aux_loss(r: RouterOutput, num_experts: int, groups: int = 1):
  """Switch/GShard: N * sum_i f_i P_i, with f_i = count_i / (K T) (the share of the routed
  slots; with null slots, of those that hold an expert) and P_i = mean_t p_{t,i}, computed
  over each of `groups` equal, consecutive slices of the tokens and averaged: 1 is the
  global batch, the number of sequences is per sequence, the data-parallel size is per
  micro-batch (the scopes compared in arXiv:2501.11873). Equals 1 under uniform routing
  (multiply by the weight alpha). N counts every expert of the router (zero-computation ones
  included: balancing them too is what keeps their share at Z / (N + Z), MoE++).
  """
  t = r.expert_index.shape[0]
  f = _shares(group_counts(r.expert_index, num_experts, groups))  # [G, N]
  p = jnp.mean(r.probs.reshape(groups, t // groups, num_experts), axis=1)  # [G, N]
  # f comes from a discrete choice: it carries no gradient, P does (as in the papers).
  return num_experts * jnp.mean(jnp.sum(jax.lax.stop_gradient(f) * p, axis=-1))


def scope_groups(scope: str, batch: int) -> int:
  """Token groups of a balance-loss scope: 'global' 1, 'sequence' the batch's sequences,
  'micro_batch' the data-parallel ranks of the current mesh (the batch axes it splits the
  batch over; 1 outside a mesh), so the loss sees what each rank sees."""
  if scope == 'global':
    return 1
  if scope == 'sequence':
    return batch
  from moejax.parallel.sharding import batch_axes_in_trace
  return batch_axes_in_trace()[1]


def sequence_aux_loss(r: RouterOutput, num_experts: int, batch: int):
  """DeepSeek-V3 sequence-wise loss: per sequence, sum_i f_i P_i with
  f_i = N / (K S) * count_i(sequence) and P_i = mean over the sequence of the normalised
  affinities; averaged over sequences. Equals 1 under uniform routing (times its weight)."""
  t = r.expert_index.shape[0]
  s = t // batch
  f = jax.lax.stop_gradient(_shares(group_counts(r.expert_index, num_experts, batch)))
  p = jnp.mean(r.probs.reshape(batch, s, num_experts), axis=1)  # [B, N]
  return jnp.mean(jnp.sum(num_experts * f * p, axis=-1))


def device_balance_loss(r: RouterOutput, num_experts: int, devices: int):
  """DeepSeekMoE device-level loss: sum_d f'_d P'_d, with f'_d the mean over d's experts of
  f_i = N / (K T) * count_i and P'_d the sum of their P_i. Experts are split into `devices`
  contiguous groups (the layout of the expert mesh axis). Equals 1 under uniform routing.
  Only the N routed experts live on devices (zero-computation ones are left out)."""
  f = _shares(expert_counts(r.expert_index, num_experts)) * num_experts
  p = jnp.mean(r.probs[:, :num_experts], axis=0)
  f_dev = jnp.mean(jax.lax.stop_gradient(f).reshape(devices, -1), axis=-1)  # [D]
  p_dev = jnp.sum(p.reshape(devices, -1), axis=-1)  # [D]
  return jnp.sum(f_dev * p_dev)


def comm_balance_loss(r: RouterOutput, num_experts: int, devices: int, max_devices: int):
  """DeepSeek-V2 communication balance: sum_d f''_d P''_d, f''_d = D / (M T) * (tokens sent
  to device d, each token counted once per device), P''_d the sum of P over d's experts.
  M is the number of devices a token may reach. Equals 1 under uniform routing."""
  t, _ = r.expert_index.shape
  device_of = r.expert_index // (num_experts // devices)  # [T, K]; null slots: >= D
  sent = jnp.zeros((t, devices), jnp.float32).at[jnp.arange(t)[:, None], device_of].set(
      1.0, mode='drop')
  f = jnp.sum(sent, axis=0) * devices / (max_devices * t)  # [D]
  p = jnp.sum(jnp.mean(r.probs[:, :num_experts], axis=0).reshape(devices, -1), axis=-1)
  return jnp.sum(jax.lax.stop_gradient(f) * p)


def importance_loss(r: RouterOutput, num_experts: int):
  """Shazeer 2017: CV(importance)^2, importance_i = sum_t gate weight of expert i."""
  t, _ = r.expert_index.shape
  gates = jnp.zeros((t, num_experts), jnp.float32).at[
      jnp.arange(t)[:, None], r.expert_index].add(r.combine_weights, mode='drop')
  imp = jnp.sum(gates, axis=0)
  return jnp.var(imp) / jnp.square(jnp.mean(imp))


def load_loss(r: RouterOutput, num_experts: int):
  """Shazeer 2017: CV(load)^2. With a noisy router in training, load is its smooth estimate
  (differentiable); otherwise the expert counts, which carry no gradient (a monitor only)."""
  load = r.soft_load
  if load is None:
    load = expert_counts(r.expert_index, num_experts)
  return jnp.var(load) / jnp.square(jnp.mean(load))


def router_z_loss(r: RouterOutput):
  """ST-MoE: mean_t (logsumexp_i logits_{t,i})^2."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(r.logits, axis=-1)))


def entropy_loss(r: RouterOutput):
  """The dynamic loss of top-p routing (Huang 2024, arXiv:2403.07652): the mean entropy of the
  router's distribution, -mean_t sum_i p_{t,i} log p_{t,i}. Minimising it sharpens the
  distribution, so that few experts reach the threshold p (without it, a flat distribution
  would activate many experts)."""
  return mean_entropy(r.probs)


def mean_entropy(probs):
  """-mean_t sum_i p log p of probs [T, N]: the 'router_entropy' statistic, and (the same
  expression, computed once under jit) the entropy loss."""
  return jnp.mean(-jnp.sum(probs * jnp.log(probs + 1e-9), axis=-1))


def l1_penalty(r: RouterOutput, target: float):
  """ReMoE's load-balanced L1 penalty on the ReLU gates R = relu(logits) [T, N] (Wang 2024,
  arXiv:2412.14711, L_reg,lb): mean_t sum_e f_e R_{t,e}, f_e = N / (k T) * #{t: R_{t,e} > 0}
  with k the target of active experts per token (no gradient through f). Its coefficient is
  adaptive (l1_coef_update)."""
  gates = jax.nn.relu(r.logits)  # [T, N]
  t, n = gates.shape
  f = jnp.sum((gates > 0).astype(jnp.float32), axis=0) * n / (target * t)  # [N]
  return jnp.mean(jnp.sum(jax.lax.stop_gradient(f) * gates, axis=-1))


def l1_coef_update(r: RouterOutput, coef, target: float, growth: float):
  """ReMoE's controller of the L1 coefficient: lambda <- lambda * alpha^sign(S* - S), S the
  fraction of zero gates of this batch, S* = 1 - k / N the sparsity of k active experts per
  token: the penalty grows while the routing is denser than the target and shrinks while it
  is sparser."""
  n = r.logits.shape[-1]
  sparsity = jnp.mean((r.logits <= 0).astype(jnp.float32))
  return coef * growth ** jnp.sign((1.0 - target / n) - sparsity)


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


def _expert_axis_in_trace() -> int:
  """The size of the 'expert' axis of the mesh being traced under (1 outside a mesh): where
  balance.num_devices = 0 puts the device groups of the device and communication losses."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty or 'expert' not in mesh.axis_names else int(mesh.shape['expert'])


def token_choice_stats(r: RouterOutput, num_experts: int) -> dict:
  return load_stats(expert_counts(r.expert_index, num_experts), r.probs)


def token_choice_losses(routing, cfg, batch: int) -> dict:
  """Unweighted balance losses of a token-choice routing. The Switch, sequence-wise and Shazeer
  losses balance all the router's experts (probs [T, N + Z]); the device and communication
  losses the N routed ones, which live on devices."""
  n, r, bal = cfg.num_experts, cfg.router, cfg.balance
  every = routing.probs.shape[-1]  # N, plus the router's zero-computation experts
  devices = bal.num_devices or _expert_axis_in_trace()
  # M, the devices a token can reach: the kept groups (device-limited routing) or K experts.
  reach = r.topk_groups if r.num_groups > 1 else cfg.num_experts_per_tok
  max_devices = min(reach, devices)
  losses = {
      'aux_loss': switch_aux_loss(routing, every, scope_groups(bal.aux_loss_scope, batch)),
      'seq_aux_loss': sequence_aux_loss(routing, every, batch),
      'device_loss': device_balance_loss(routing, n, devices),
      'comm_loss': comm_balance_loss(routing, n, devices, max_devices),
      'importance_loss': importance_loss(routing, every),
      'load_loss': load_loss(routing, every),
      'entropy_loss': entropy_loss(routing),
  }
  if bal.l1_target > 0:
    losses['l1_loss'] = l1_penalty(routing, bal.l1_target)
  return losses


def layer_losses(routing: RouterOutput, cfg, batch: int):
  """(unweighted losses, expert counts [N]) of one MoE layer's routing. Expert choice gives
  every expert exactly C tokens: its balance losses have nothing to balance (0), only the
  z-loss applies."""
  n = cfg.num_experts
  if routing.expert_choice is not None:
    losses = {k: jnp.zeros((), jnp.float32) for k in LOSS_WEIGHTS}
    counts = jnp.full((n,), routing.expert_choice.token_index.shape[1], jnp.float32)
  else:
    losses = token_choice_losses(routing, cfg, batch)
    counts = expert_counts(routing.expert_index, n)
  losses['z_loss'] = router_z_loss(routing)
  return losses, counts


def weighted_loss(losses: dict, balance_cfg, state: dict):
  """sum of each loss times its weight: the config's (LOSS_WEIGHTS), or for the ReLU router's
  L1 penalty the adaptive coefficient of the layer's state."""
  total = sum(balance_cfg[w] * losses[k] for k, w in LOSS_WEIGHTS.items() if k in losses)
  if 'l1_loss' in losses:
    total = total + jax.lax.stop_gradient(state['l1_coef']) * losses['l1_loss']
  return total


# Each loss of a MoE layer and the balance config field holding its weight.
LOSS_WEIGHTS = {'aux_loss': 'aux_loss_weight', 'z_loss': 'z_loss_weight',
                'seq_aux_loss': 'seq_aux_loss_weight', 'device_loss': 'device_loss_weight',
                'comm_loss': 'comm_loss_weight', 'importance_loss': 'importance_loss_weight',
                'load_loss': 'load_loss_weight', 'entropy_loss': 'entropy_loss_weight'}
