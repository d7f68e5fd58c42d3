"""Dropless dispatch on one device (MegaBlocks): every (token, choice) pair runs on its expert."""
from __future__ import annotations

import dataclasses

from moejax.moe.dispatch.base import GROUPED_KERNEL, Dispatcher, no_drops, register
from moejax.moe.types import RouterOutput


@register('dropless')
@dataclasses.dataclass(frozen=True)
class DroplessDispatch(Dispatcher):
  """No token is dropped: every (token, choice) pair runs on its expert (experts.dropless)."""
  READS = GROUPED_KERNEL

  def __call__(self, x, r: RouterOutput, experts, train: bool):
    del train
    y = experts.dropless(x, r.expert_index, r.combine_weights)
    return y, no_drops()
