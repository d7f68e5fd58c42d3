"""Dropless expert parallelism, the ring of experts (config dispatch.name='ring').

Within each group of devices along the 'expert' mesh axis, every device all-gathers the group's
tokens (with their routing), runs its own N / EP experts dropless on the (token, choice) pairs
routed to them, and the partial outputs are reduce-scattered back, so each device ends with the
full MoE output of its own tokens. Nothing has a capacity and nothing is dropped; the price is
that every device receives all EP x T_device tokens (bytes per token, device and layer:
planner.ring_bytes_per_token, printed by `params --mesh` and `bench moe` next to the all-to-all
figures). Only all_gather and psum_scatter are used, which every backend has (the approach
Marin found fastest on GPUs).

Buffers are static: a device's sorted buffer holds all EP x T_device x K pairs, the pairs of
other devices' experts parked past its groups, which the grouped matmul leaves at zero and does
not compute (blocked backend) or masks (ragged_dot).

Outside a mesh (or with expert=1) it is the dropless path on this device's tokens.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax.moe.dispatch import dropless_combine
from moejax.moe.experts import RoutedExperts, grouped_swiglu
from moejax.moe.routers import RouterOutput
from moejax.parallel.sharding import BATCH_AXES


@dataclasses.dataclass(frozen=True)
class RingDispatch:

  def __call__(self, x, r: RouterOutput, experts: RoutedExperts, train: bool):
    del train
    t, _ = x.shape
    n = experts.num_experts
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(a for a in BATCH_AXES if not mesh.empty and a in mesh.axis_names)
    ep = mesh.shape['expert'] if 'expert' in axes else 1
    groups = 1
    for a in axes:
      groups *= mesh.shape[a]
    if t % groups or n % ep:
      raise ValueError(f'ring dispatch: {t} tokens over {groups} devices and {n} experts over '
                       f'expert={ep} must both divide evenly (train.batch_size, mesh.*)')
    grouped = functools.partial(grouped_swiglu, backend=experts.backend,
                                block_size=experts.block_size)

    def local(x, index, gate, wi_0, wi_1, wo):  # this device's tokens, its N/EP experts
      if ep > 1:  # the expert group's tokens [EP * Tl, ...]
        x, index, gate = (jax.lax.all_gather(a, 'expert', axis=0, tiled=True)
                          for a in (x, index, gate))
        first = jax.lax.axis_index('expert') * (n // ep)
      else:
        first = 0
      y = dropless_combine(x, index, gate, n // ep, first,
                           lambda xs, sizes: grouped(xs.astype(wi_0.dtype), sizes, wi_0, wi_1,
                                                     wo))
      if ep > 1:  # sum the devices' partial outputs; keep my tokens' rows
        y = jax.lax.psum_scatter(y, 'expert', scatter_dimension=0, tiled=True)
      return y

    args = (x, r.expert_index, r.combine_weights, *experts.weights())
    if axes:
      tokens, expert = P(axes), P('expert' if ep > 1 else None)
      # check_vma=False: the blocked backend's hand-written VJP starts its gradient carry
      # from the weights (varying over 'expert' only) and adds token terms (varying over the
      # batch axes) under lax.cond; the gradients are checked against one device.
      local = jax.shard_map(local, mesh=mesh, in_specs=(tokens,) * 3 + (expert,) * 3,
                            out_specs=tokens, check_vma=False)
    y = local(*args)
    return y, {'dropped_fraction': jnp.zeros((), jnp.float32),
               'zero_expert_fraction': jnp.zeros((), jnp.float32)}
