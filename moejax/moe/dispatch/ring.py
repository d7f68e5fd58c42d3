"""Dropless expert parallelism, the ring of experts (config dispatch.name='ring').

Within each group of devices along the 'expert' mesh axis, every device all-gathers the group's
tokens (with their routing), runs its own N / EP experts dropless on the (token, choice) pairs
routed to them, and the partial outputs are reduce-scattered back, so each device ends with the
full MoE output of its own tokens. Nothing has a capacity and nothing is dropped; the price is
that every device receives all EP x T_device tokens (bytes per token, device and layer:
planner.ring_bytes_per_token, printed by `params --mesh` and `bench moe` next to the all-to-all
figures). Only all_gather and psum_scatter are used, which every backend has (the approach
Marin found fastest on GPUs).

Buffers are static: a device's layout holds all EP x T_device x K pairs, the pairs of other
devices' experts parked past its groups, which the blocked backend never computes and
ragged_dot masks.

Outside a mesh (or with expert=1) it is the dropless path on this device's tokens.
"""
from __future__ import annotations

import dataclasses

import jax

from moejax.moe.dispatch.base import register
from moejax.moe.dispatch.ep import DroplessEP


@register('ring')
@dataclasses.dataclass(frozen=True)
class RingDispatch(DroplessEP):
  """All-gather the expert group's tokens, run the local experts dropless, reduce-scatter."""

  def exchange(self, x, index, gates, local, num_experts: int, ep: int):
    # The expert group's tokens and routing [EP * Tl, ...].
    x, index, gates = (jax.lax.all_gather(a, 'expert', axis=0, tiled=True)
                       for a in (x, index, gates))
    per = num_experts // ep
    y = local.dropless(x, index, gates, jax.lax.axis_index('expert') * per)
    # Sum the devices' partial outputs; keep my tokens' rows.
    return jax.lax.psum_scatter(y, 'expert', scatter_dimension=0, tiled=True)
