"""Balance in one room: the balance losses and their weights, the loss-free selection bias
and its update, and the routing statistics, computed from a RouterOutput.

Counts are taken over every token the layer sees in one call. Under jit with a sharded batch
these are global sums (GSPMD inserts the reductions), so statistics do not depend on the mesh.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.moe.types import RouterOutput


def selection_bias(module, num_experts: int, balance_cfg):
  """The auxiliary-loss-free selection bias [N] of a MoE layer (Wang 2024; DeepSeek-V3), or
  None. It lives in the layer's 'moe_state' collection, is added to the scores for selection
  only (never to the gate weights) and gets no gradient. It exists when bias updates are on
  (balance.bias_update_rate > 0), when balance.selection_bias asks for one, or when the state
  already holds one (e.g. imported); without updates it stays fixed."""
  if (balance_cfg.bias_update_rate <= 0 and not balance_cfg.selection_bias and
      not module.has_variable('moe_state', 'bias')):
    return None
  if balance_cfg.bias_update == 'damped' and balance_cfg.bias_update_rate > 0:
    module.variable('moe_state', 'bias_momentum', lambda: jnp.zeros((num_experts,), jnp.float32))
  return module.variable('moe_state', 'bias',
                         lambda: jnp.zeros((num_experts,), jnp.float32)).value


def damped_update(counts, rate: float, bias, momentum, beta: float, clamp: float):
  """'damped' (momentum and soft clamping, in the manner of SMEBU): the proportional step
  g_i = (mean - c_i) / mean is averaged, m <- beta m + (1 - beta) g, and the bias moves by
  u m then is squashed softly into (-clamp, clamp): b <- clamp tanh((b + u m) / clamp)
  (clamp 0: no clamp). Returns (new bias, new momentum)."""
  g = (jnp.mean(counts) - counts) / jnp.mean(counts)
  m = beta * momentum + (1 - beta) * g
  b = bias + rate * m
  return (clamp * jnp.tanh(b / clamp) if clamp > 0 else b), m


def selection_scores(r: RouterOutput, score_fn: str):
  """The scores the bias is added to for selection: sigmoid or softmax of the logits [T, N]."""
  return jax.nn.sigmoid(r.logits) if score_fn == 'sigmoid' else jax.nn.softmax(r.logits, -1)


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
  """Tokens routed to each expert (before any capacity drop): [N] float32."""
  return jnp.zeros((num_experts,), jnp.float32).at[expert_index.reshape(-1)].add(1.0)


def group_counts(expert_index, num_experts: int, groups: int):
  """expert_counts of each of `groups` equal, consecutive slices of the tokens: [G, N]."""
  index = expert_index.reshape(groups, -1)
  return jax.vmap(lambda i: expert_counts(i, num_experts))(index)


def switch_aux_loss(r: RouterOutput, num_experts: int, groups: int = 1):
  """Switch/GShard: N * sum_i f_i P_i, with f_i = count_i / (K T) and P_i = mean_t p_{t,i},
  computed over each of `groups` equal, consecutive slices of the tokens and averaged: 1 is the
  global batch, the number of sequences is per sequence, the data-parallel size is per
  micro-batch (the scopes compared in arXiv:2501.11873). Equals 1 under uniform routing
  (multiply by the weight alpha).
  """
  t, k = r.expert_index.shape
  f = group_counts(r.expert_index, num_experts, groups) / (k * t // groups)  # [G, N]
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
  t, k = r.expert_index.shape
  s = t // batch
  counts = group_counts(r.expert_index, num_experts, batch)
  f = jax.lax.stop_gradient(counts) * num_experts / (k * s)  # [B, N]
  p = jnp.mean(r.probs.reshape(batch, s, num_experts), axis=1)  # [B, N]
  return jnp.mean(jnp.sum(f * p, axis=-1))


def device_balance_loss(r: RouterOutput, num_experts: int, devices: int):
  """DeepSeekMoE device-level loss: sum_d f'_d P'_d, with f'_d the mean over d's experts of
  f_i = N / (K T) * count_i and P'_d the sum of their P_i. Experts are split into `devices`
  contiguous groups (the layout of the expert mesh axis). Equals 1 under uniform routing."""
  t, k = r.expert_index.shape
  f = expert_counts(r.expert_index, num_experts) * num_experts / (k * t)
  p = jnp.mean(r.probs, axis=0)
  f_dev = jnp.mean(jax.lax.stop_gradient(f).reshape(devices, -1), axis=-1)  # [D]
  p_dev = jnp.sum(p.reshape(devices, -1), axis=-1)  # [D]
  return jnp.sum(f_dev * p_dev)


def comm_balance_loss(r: RouterOutput, num_experts: int, devices: int, max_devices: int):
  """DeepSeek-V2 communication balance: sum_d f''_d P''_d, f''_d = D / (M T) * (tokens sent
  to device d, each token counted once per device), P''_d the sum of P over d's experts.
  M is the number of devices a token may reach. Equals 1 under uniform routing."""
  t, _ = r.expert_index.shape
  device_of = r.expert_index // (num_experts // devices)  # [T, K]
  sent = jnp.zeros((t, devices), jnp.float32).at[jnp.arange(t)[:, None], device_of].set(1.0)
  f = jnp.sum(sent, axis=0) * devices / (max_devices * t)  # [D]
  p = jnp.sum(jnp.mean(r.probs, axis=0).reshape(devices, -1), axis=-1)
  return jnp.sum(jax.lax.stop_gradient(f) * p)


def importance_loss(r: RouterOutput, num_experts: int):
  """Shazeer 2017: CV(importance)^2, importance_i = sum_t gate weight of expert i."""
  t, _ = r.expert_index.shape
  gates = jnp.zeros((t, num_experts), jnp.float32).at[
      jnp.arange(t)[:, None], r.expert_index].add(r.combine_weights)
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


def load_stats(counts, probs) -> dict:
  """Statistics of expert counts [N] (routed assignments, before any drop) and probs [T, N]."""
  load = counts / jnp.sum(counts)  # [N] share of routed assignments per expert.
  mean = jnp.mean(counts)
  return {
      'expert_load': load,
      'max_vio': (jnp.max(counts) - mean) / mean,
      'cv': jnp.std(counts) / mean,
      'router_entropy': jnp.mean(-jnp.sum(probs * jnp.log(probs + 1e-9), axis=-1)),
  }


def token_choice_stats(r: RouterOutput, num_experts: int) -> dict:
  return load_stats(expert_counts(r.expert_index, num_experts), r.probs)


def token_choice_losses(routing, cfg, batch: int) -> dict:
  """Unweighted balance losses of a token-choice routing."""
  n, r, bal = cfg.num_experts, cfg.router, cfg.balance
  devices = bal.num_devices or 1
  # M, the devices a token can reach: the kept groups (device-limited routing) or K experts.
  reach = r.topk_groups if r.num_groups > 1 else cfg.num_experts_per_tok
  max_devices = min(reach, devices)
  return {
      'aux_loss': switch_aux_loss(routing, n, scope_groups(bal.aux_loss_scope, batch)),
      'seq_aux_loss': sequence_aux_loss(routing, n, batch),
      'device_loss': device_balance_loss(routing, n, devices),
      'comm_loss': comm_balance_loss(routing, n, devices, max_devices),
      'importance_loss': importance_loss(routing, n),
      'load_loss': load_loss(routing, n),
  }


# Each loss of a MoE layer and the balance config field holding its weight.
LOSS_WEIGHTS = {'aux_loss': 'aux_loss_weight', 'z_loss': 'z_loss_weight',
                'seq_aux_loss': 'seq_aux_loss_weight', 'device_loss': 'device_loss_weight',
                'comm_loss': 'comm_loss_weight', 'importance_loss': 'importance_loss_weight',
                'load_loss': 'load_loss_weight'}
