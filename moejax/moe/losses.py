"""The balance losses, one table row each (LOSSES): the name it is logged under, the config field
that weights it, the other fields it reads, and its function of the routing.

Everything else derives from the table: which fields a token-choice router reads (registry),
the weights' validation (checks), the layer's weighted sum, the logged metrics (training/step),
and the losses the final line shows (training/loop). Adding a loss is one row and its function.

A loss is computed only when its weight is not 0, or when it is a `monitor` (logged whatever its
weight: the Switch loss and the z-loss are what balance is read by, in every run). Expert-choice
routing has nothing to balance: its monitors are 0 and only the z-loss is computed.

Counts are taken over every token the layer sees in one call. Under jit with a sharded batch
these are global sums (GSPMD inserts the reductions), so losses do not depend on the mesh.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from moejax.moe.types import RouterOutput
from moejax.parallel.mesh import batch_axes_in_trace, expert_axis_in_trace


@dataclasses.dataclass(frozen=True)
class Loss:
  """One balance loss.

  name: its key in the layer's aux and its metric, moe/<name>.
  weight: the field under model.moe.balance that weights it; 0 turns it off.
  fn: fn(routing, moe config, sequences in the call) -> the unweighted loss, a scalar.
  reads: other fields under model.moe.balance it reads.
  monitor: computed and logged even when its weight is 0.
  general: offered by every token-choice router; False: only by routers that name it in
    their LOSSES (it needs what only they produce).
  coefficient: a layer-state entry (moe/balance.py layer_state) that weights it instead of the
    field, which then only switches it on (> 0).
  default: the weight field's default (the config schema's).
  """
  name: str
  weight: str
  fn: Callable
  default: float = 0.0
  reads: tuple = ()
  monitor: bool = False
  general: bool = True
  coefficient: str = ''

  @property
  def fields(self) -> tuple:
    """Its config fields under model.moe."""
    return tuple(f'balance.{f}' for f in (self.weight, *self.reads))

  def on(self, balance_cfg) -> bool:
    """Whether its weight turns it on."""
    return balance_cfg[self.weight] != 0


def _shares(counts):
  """counts [..., N] -> each expert's share of the routed slots (K T of them with K fixed;
  fewer with null slots), summing to 1 (0 where nothing was routed)."""
  return counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)


def expert_counts(expert_index, num_experts: int):
  """Tokens routed to each expert [num_experts] float32 (before any capacity drop). Slots whose
  index is num_experts or more (null slots, or experts beyond those counted) count nowhere."""
  return jnp.zeros((num_experts,), jnp.float32).at[expert_index.reshape(-1)].add(1.0,
                                                                                 mode='drop')


def group_counts(expert_index, num_experts: int, groups: int):
  """expert_counts of each of `groups` equal, consecutive slices of the tokens: [G, N]."""
  index = expert_index.reshape(groups, -1)
  return jax.vmap(lambda i: expert_counts(i, num_experts))(index)


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


def mean_entropy(probs):
  """-mean_t sum_i p log p of probs [T, N]: the 'router_entropy' statistic, and (the same
  expression, computed once under jit) top-p routing's entropy loss."""
  return jnp.mean(-jnp.sum(probs * jnp.log(probs + 1e-9), axis=-1))


def entropy_loss(r: RouterOutput):
  """The dynamic loss of top-p routing (Huang 2024, arXiv:2403.07652): the mean entropy of the
  router's distribution, -mean_t sum_i p_{t,i} log p_{t,i}. Minimising it sharpens the
  distribution, so that few experts reach the threshold p (without it, a flat distribution
  would activate many experts)."""
  return mean_entropy(r.probs)


def l1_penalty(r: RouterOutput, target: float):
  """ReMoE's load-balanced L1 penalty on the ReLU gates R = relu(logits) [T, N] (Wang 2024,
  arXiv:2412.14711, L_reg,lb): mean_t sum_e f_e R_{t,e}, f_e = N / (k T) * #{t: R_{t,e} > 0}
  with k the target of active experts per token (no gradient through f). Its coefficient is
  adaptive (balance.l1_coef_update)."""
  gates = jax.nn.relu(r.logits)  # [T, N]
  t, n = gates.shape
  f = jnp.sum((gates > 0).astype(jnp.float32), axis=0) * n / (target * t)  # [N]
  return jnp.mean(jnp.sum(jax.lax.stop_gradient(f) * gates, axis=-1))


def simbal_loss(r: RouterOutput):
  """SimBal (arXiv:2506.14038): || W^T W - I ||_1 over the router weight W [D, N + Z] (entrywise,
  summed): near-orthogonal expert columns keep similar tokens' scores similar (the router
  preserves token similarity), which balances without pushing every token toward uniform."""
  w = r.router_weight.astype(jnp.float32)
  gram = w.T @ w  # [N + Z, N + Z]
  return jnp.sum(jnp.abs(gram - jnp.eye(gram.shape[0], dtype=gram.dtype)))


def _devices(moe) -> int:
  """The device groups of the device and communication losses: balance.num_devices, or (0)
  the size of the expert axis of the mesh being traced."""
  return moe.balance.num_devices or expert_axis_in_trace()


def _max_devices(moe) -> int:
  """M, the devices a token can reach: the kept groups (device-limited routing) or K."""
  r = moe.router
  reach = r.topk_groups if r.num_groups > 1 else moe.num_experts_per_tok
  return min(reach, _devices(moe))


def _every(r: RouterOutput) -> int:
  """N, plus the router's zero-computation experts: the experts the router scores."""
  return r.probs.shape[-1]


LOSSES = (
    Loss('aux_loss', 'aux_loss_weight', lambda r, moe, b: switch_aux_loss(
        r, _every(r), scope_groups(moe.balance.aux_loss_scope, b)), default=1e-2,
         reads=('aux_loss_scope',), monitor=True),
    Loss('z_loss', 'z_loss_weight', lambda r, moe, b: router_z_loss(r), default=1e-3,
         monitor=True),
    Loss('seq_aux_loss', 'seq_aux_loss_weight',
         lambda r, moe, b: sequence_aux_loss(r, _every(r), b)),
    Loss('device_loss', 'device_loss_weight', lambda r, moe, b: device_balance_loss(
        r, moe.num_experts, _devices(moe)), reads=('num_devices',)),
    Loss('comm_loss', 'comm_loss_weight', lambda r, moe, b: comm_balance_loss(
        r, moe.num_experts, _devices(moe), _max_devices(moe)), reads=('num_devices',)),
    Loss('importance_loss', 'importance_loss_weight',
         lambda r, moe, b: importance_loss(r, _every(r))),
    Loss('load_loss', 'load_loss_weight', lambda r, moe, b: load_loss(r, _every(r))),
    Loss('entropy_loss', 'entropy_loss_weight', lambda r, moe, b: entropy_loss(r)),
    # ReMoE: switched on by a target of active experts per token; weighted by the adaptive
    # coefficient the layer keeps (balance.layer_state), which l1_init and l1_growth drive.
    Loss('l1_loss', 'l1_target', lambda r, moe, b: l1_penalty(r, moe.balance.l1_target),
         reads=('l1_init', 'l1_growth'), general=False, coefficient='l1_coef'),
    # A loss on the router's own weights: offered by the routers that have them.
    Loss('simbal_loss', 'simbal_loss_weight', lambda r, moe, b: simbal_loss(r), general=False),
)
BY_NAME = {loss.name: loss for loss in LOSSES}


def weight_defaults() -> dict:
  """{weight field: default} of every loss (the balance section of the config schema)."""
  return {loss.weight: loss.default for loss in LOSSES}


def general_fields() -> tuple:
  """The config fields of the losses every token-choice router offers."""
  return tuple(f for loss in LOSSES if loss.general for f in loss.fields)


def switches() -> tuple:
  """The fields whose value 0 turns a loss off, whichever pieces are chosen."""
  return tuple(loss.fields[0] for loss in LOSSES)


def layer_losses(routing: RouterOutput, moe, batch: int) -> dict:
  """{name: unweighted loss} of one MoE layer's routing: the losses that are on or monitors.

  Args:
    routing: the layer's RouterOutput (expert_index [T, K], probs [T, N + Z], ...).
    moe: the model.moe config.
    batch: sequences in the call (T = batch * sequence length).
  Returns:
    {name: scalar}; for expert choice the monitors other than the z-loss are 0.
  """
  out = {}
  for loss in LOSSES:
    on = loss.on(moe.balance)
    if not (on or loss.monitor):
      continue
    if routing.expert_choice is not None and loss.name != 'z_loss':
      out[loss.name] = jnp.zeros((), jnp.float32)  # every expert takes exactly C tokens
      continue
    out[loss.name] = loss.fn(routing, moe, batch)
  return out


def weighted_loss(losses: dict, balance_cfg, state: dict):
  """sum over the losses that are on of weight x loss: the config field, or the layer-state
  coefficient for losses that have one."""
  total = 0
  for loss in LOSSES:
    if loss.name not in losses or not loss.on(balance_cfg):
      continue
    weight = (jax.lax.stop_gradient(state[loss.coefficient]) if loss.coefficient
              else balance_cfg[loss.weight])
    total = total + weight * losses[loss.name]
  return total
