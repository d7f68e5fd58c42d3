"""Expert parallelism's layout: how the tokens and experts of one MoE call lie on the mesh of
the current trace, and the base of the dropless expert-parallel dispatchers (ring.py, ragged.py),
which differ only in how a device's tokens reach the devices holding their experts.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from moejax.moe.dispatch.base import GROUPED_KERNEL, Dispatcher, no_drops
from moejax.moe.types import RouterOutput
from moejax.parallel.mesh import batch_axes_in_trace, expert_axis_in_trace


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
  """The layout of `tokens` tokens and `num_experts` experts on the mesh being traced; both
  must split evenly (else a ValueError naming the dispatcher `name`)."""
  mesh = jax.sharding.get_abstract_mesh()
  axes, groups = batch_axes_in_trace()
  ep = expert_axis_in_trace()
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
  READS = GROUPED_KERNEL

  @abc.abstractmethod
  def exchange(self, x, index, gates, local, num_experts: int, ep: int):
    """This device's MoE output [Tl, D] (see the class docstring)."""

  def __call__(self, x, r: RouterOutput, experts, train: bool):
    del train
    n = experts.num_experts
    layout = ep_layout(self.NAME, x.shape[0], n)

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
    return y, no_drops()
