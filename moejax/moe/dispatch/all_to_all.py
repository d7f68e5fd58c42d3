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

import dataclasses

import jax
from jax.sharding import PartitionSpec as P

from moejax.moe.dispatch.base import drop_stats, register, stats_dict
from moejax.moe.dispatch.capacity import (TokenDropping, capacity_slots, combine_slots,
                                          pack_slots)
from moejax.moe.dispatch.ep import ep_layout
from moejax.moe.types import RouterOutput


@register('all_to_all')
@dataclasses.dataclass(frozen=True)
class AllToAllDispatch(TokenDropping):
  """Capacity buffers per device, exchanged with all_to_all over the 'expert' axis."""

  def __call__(self, x, r: RouterOutput, experts, train: bool):
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
