"""The FFN schedule, spelled once: which layers are dense and which MoE, and what follows from
it (whether the model's routing is causal).

Layers: the first `first_k_dense` are dense; after them, every `moe_layer_freq`-th layer is MoE
(a period is one MoE layer and freq - 1 dense ones); the leftover layers (< freq) form a shorter
tail period.
"""
from __future__ import annotations

from moejax.moe import registry


def layer_plan(m) -> tuple[int, int, int]:
  """(dense prefix length, number of full periods, tail length) of model config m."""
  rest = m.num_layers - min(m.first_k_dense, m.num_layers)
  return m.num_layers - rest, rest // m.moe_layer_freq, rest % m.moe_layer_freq


def moe_layer_ids(m) -> list[int]:
  """The layers with a MoE FFN, in order: the first layer of each period (tail included)."""
  prefix, periods, tail = layer_plan(m)
  return [prefix + m.moe_layer_freq * i for i in range(periods + bool(tail))]


def has_moe(m) -> bool:
  """Whether model config m has any MoE layer (then its MTP blocks are MoE too)."""
  return any(layer_plan(m)[1:])


def routing_is_causal(m, train: bool) -> bool:
  """Whether a token's routed output ignores later tokens of the batch, in training or at
  evaluation. Each router and dispatcher declares its own causality (moe/registry.py); e.g.
  expert choice (unless evaluated as token-choice top-K), Sinkhorn in training, and capacity
  dispatch that serves all first choices before second choices, or the highest router weights
  first, are not."""
  if not has_moe(m):
    return True
  return registry.routing_is_causal(m.moe, train)
