"""Expert parallelism written out with shard_map and all_to_all (config dispatch.name='all_to_all').

Each device packs its own tokens into fixed-size buffers [N, C, D] (capacity per device, like
GShard's groups: C = ceil(factor * K * T_device / N)), sends buffer block j (the experts device
j holds along the 'expert' mesh axis) to device j with one all_to_all, runs its N / EP experts
on the EP * C rows it received, and sends the results back with a second all_to_all. Buffers
have a fixed size, so nothing can overflow: what does not fit is dropped (and counted), exactly
as the einsum path with group_size = tokens per device drops it (tested).

Outside a mesh (or with expert=1) it runs the same code on one group without collectives.
Tokens are replicated across the 'tensor' axis, so tensor ranks repeat the expert work; expert
weights split by fsdp/tensor are gathered onto the expert shards by GSPMD before the shard_map.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax.moe.dispatch import (GROUPED_KERNEL, Dispatcher, TokenDropping, capacity_slots,
                                 combine_slots, drop_stats, pack_slots, stats_dict)
from moejax.moe.experts import ExpertShard, RoutedExperts
from moejax.moe.types import RouterOutput
from moejax.parallel.sharding import batch_axes_in_trace


@dataclasses.dataclass(frozen=True)
class EPLayout:
  """How the tokens and experts of one MoE call lie on the mesh of the current trace."""
  mesh: Any
  axes: tuple  # the batch axes present: tokens are split over all of them
  groups: int  # devices the tokens are split over
  ep: int  # size of the 'expert' axis: experts are split over it

  def per_device(self, local, out_specs, check_vma: bool = True):
    """local(x, expert_index, gates, *expert weights) on every device's tokens and experts
    (shard_map; the weights, however many the expert block has, split over 'expert'), or
    called as it is outside a mesh."""
    if not self.axes:
      return local
    tokens, expert = P(self.axes), P('expert' if self.ep > 1 else None)

    def call(*args):
      return jax.shard_map(local, mesh=self.mesh, in_specs=(tokens,) * 3 + (expert,) * (
          len(args) - 3), out_specs=out_specs(tokens), check_vma=check_vma)(*args)
    return call


def ep_layout(name: str, tokens: int, num_experts: int) -> EPLayout:
  mesh = jax.sharding.get_abstract_mesh()
  axes, groups = batch_axes_in_trace()
  ep = mesh.shape['expert'] if 'expert' in axes else 1
  if tokens % groups or num_experts % ep:
    raise ValueError(f'{name} dispatch: {tokens} tokens over {groups} devices and {num_experts} '
                     f'experts over expert={ep} must both divide evenly (train.batch_size, '
                     'mesh.*)')
  return EPLayout(mesh, axes, groups, ep)


@dataclasses.dataclass(frozen=True)
class DroplessEP(Dispatcher, abc.ABC):
  """Dropless dispatch with the experts split over the 'expert' axis. A subclass gives the
  exchange: `exchange(x, expert_index, gates, local, num_experts, ep)` on one device's tokens
  inside shard_map returns their MoE output, where `local` (the expert block's ExpertShard)
  runs this device's N / EP experts."""
  name = ''
  READS = GROUPED_KERNEL

  @abc.abstractmethod
  def exchange(self, x, index, gates, local: ExpertShard, num_experts: int, ep: int):
    """This device's MoE output [Tl, D] (see the class docstring)."""

  def __call__(self, x, r: RouterOutput, experts: RoutedExperts, train: bool):
    del train
    n = experts.num_experts
    layout = ep_layout(self.name, x.shape[0], n)

    def local(x, index, gates, *weights):
      mine = experts.shard(weights)
      if layout.ep == 1:
        return mine.dropless(x, index, gates, 0)
      return self.exchange(x, index, gates, mine, n, layout.ep)

    # check_vma=False: the blocked backend's hand-written VJP starts its gradient carry from
    # the weights (varying over 'expert' only) and adds token terms (varying over the batch
    # axes) under lax.cond; the gradients are tested against one device instead.
    local = layout.per_device(local, lambda tokens: tokens, check_vma=False)
    y = local(x, r.expert_index, r.combine_weights, *experts.weights())
    return y, {'dropped_fraction': jnp.zeros((), jnp.float32),
               'zero_expert_fraction': jnp.zeros((), jnp.float32)}


@dataclasses.dataclass(frozen=True)
class AllToAllDispatch(TokenDropping):

  def __call__(self, x, r: RouterOutput, experts: RoutedExperts, train: bool):
    t, d = x.shape
    k = r.expert_index.shape[1]
    n = experts.num_experts
    layout = ep_layout('all_to_all', t, n)
    axes, groups, ep = layout.axes, layout.groups, layout.ep
    c = self.capacity(t // groups, k, n, train)
    weights = experts.weights()

    def local(x, index, gate, *weights):  # this device's tokens and experts
      slots = capacity_slots(index, n, c, self.priority, gate)  # [Tl, K]
      send = pack_slots(x, slots, n * c).reshape(ep, n // ep, c, d)  # block j -> expert rank j
      recv = jax.lax.all_to_all(send, 'expert', 0, 0) if ep > 1 else send  # [EP src, N/EP, C, D]
      rows = recv.transpose(1, 0, 2, 3).reshape(n // ep, ep * c, d)
      out = experts.shard(weights).capacity(rows)  # [N/EP, EP*C, D]
      out = out.reshape(n // ep, ep, c, d).transpose(1, 0, 2, 3)  # [EP dst, N/EP, C, D]
      back = jax.lax.all_to_all(out, 'expert', 0, 0) if ep > 1 else out  # my tokens' outputs
      stats = drop_stats(slots, n * c, index, n)
      return (combine_slots(back.reshape(n * c, d), slots, gate),
              jax.lax.pmean(stats, axes) if axes else stats)

    local = layout.per_device(local, lambda tokens: (tokens, P()))
    y, stats = local(x, r.expert_index, r.combine_weights, *weights)
    return y, stats_dict(stats)
