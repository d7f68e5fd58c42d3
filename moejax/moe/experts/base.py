"""What every routed expert block shares, and the registry table it registers into.

An expert block holds N experts as stacked weights (expert axis first) and offers weights() and
shard(weights) -> an object with capacity(buffers), grouped(x_sorted, sizes) and
dropless(x, index, gates, first), which is all a dispatcher calls. Its dataclass fields other
than the shape are config fields of model.moe.experts; READS names those of its own (the
kernel's, backend and block_size, are read by the dispatchers that run it); check(moe, fail)
checks them.
"""
from __future__ import annotations

from flax import linen as nn

from moejax.moe.table import Table

# config name -> class, filled by @register in each file of this folder.
EXPERTS = Table('expert block')
register = EXPERTS.register


class ExpertBlock(nn.Module):
  """What every routed expert block offers (registered in EXPERTS): a subclass defines
  weights() (stacked, expert axis first, in the compute dtype `dtype`) and shard(weights), the
  per-device call; these run all of its experts through it."""

  def capacity(self, buffers):
    """[N, C, D] buffers, one per expert -> their outputs."""
    x = nn.with_logical_constraint(buffers.astype(self.dtype), ('expert', None, 'act_embed'))
    return self.shard(self.weights()).capacity(x)  # [N, C, D]

  def grouped(self, x_sorted, group_sizes):
    return self.shard(self.weights()).grouped(x_sorted, group_sizes)

  def dropless(self, x, expert_index, gates):
    """Dropless output of all experts: x [T, D], expert_index and gates [T, K] -> [T, D]."""
    return self.shard(self.weights()).dropless(x, expert_index, gates, 0)
