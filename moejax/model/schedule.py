"""The layer schedule, spelled once: which layers are dense and which MoE, which mix tokens by
linear attention, how they are grouped into scanned stacks, and what follows from it (whether
the model's routing is causal).

Layers: the first `first_k_dense` are dense; after them, every `moe_layer_freq`-th layer is MoE.
Layer i is a linear-attention layer iff linear_pattern[i % P] (P = len(linear_pattern)).
Stacks: the dense prefix, scanned in steps of P layers (P = 1 without linear layers); periods
of lcm(P, moe_layer_freq) layers (without linear layers: one MoE layer and freq - 1 dense
ones), scanned; the leftover layers, a shorter tail period.
"""
from __future__ import annotations

import math
import typing

from moejax.moe import registry
from moejax.nn import names


class Slot(typing.NamedTuple):
  """Where layer i lives: its stack and block names, its index along the stack's layer axis
  (None in the unscanned tail), whether its FFN is MoE and whether it is a linear layer."""
  stack: str
  block: str
  index: int | None
  moe: bool
  linear: bool


def pattern_length(m) -> int:
  """P: the length of model.linear_pattern, 1 without linear layers."""
  return len(m.linear_pattern) if any(m.linear_pattern) else 1


def is_linear(m, layer: int) -> bool:
  """Whether layer `layer` mixes tokens with Gated DeltaNet."""
  return bool(any(m.linear_pattern) and m.linear_pattern[layer % len(m.linear_pattern)])


def period_length(m) -> int:
  """Layers per scanned period: lcm(P, moe_layer_freq)."""
  return math.lcm(pattern_length(m), m.moe_layer_freq)


def layer_plan(m) -> tuple[int, int, int]:
  """(dense prefix length, number of full periods, tail length) of model config m."""
  rest = m.num_layers - min(m.first_k_dense, m.num_layers)
  length = period_length(m)
  return m.num_layers - rest, rest // length, rest % length


def period_blocks(m, length: int) -> list[tuple[str, bool, bool]]:
  """(block name, MoE, linear) of each of the `length` layers of a period (a full period, or
  the tail); a period starts at a multiple of P, so its pattern does not depend on where."""
  out, dense = [], 0
  for j in range(length):
    moe = j % m.moe_layer_freq == 0
    out.append((names.moe_block(j // m.moe_layer_freq) if moe else names.dense_block(dense),
                moe, is_linear(m, j)))
    dense += not moe
  return out


def slots(m) -> list[Slot]:
  """Every layer's Slot, in order."""
  prefix, periods, tail = layer_plan(m)
  step = pattern_length(m)
  out = [Slot(names.DENSE_STACK, names.dense_layer_block(i % step, step), i // step, False,
              is_linear(m, i)) for i in range(prefix)]
  blocks = period_blocks(m, period_length(m))
  for p in range(periods):
    out += [Slot(names.MOE_STACK, name, p, moe, linear) for name, moe, linear in blocks]
  out += [Slot(names.TAIL_STACK, name, None, moe, linear)
          for name, moe, linear in period_blocks(m, tail)]
  return out


def moe_layer_ids(m) -> list[int]:
  """The layers with a MoE FFN, in order: i >= first_k_dense, every moe_layer_freq-th."""
  first = min(m.first_k_dense, m.num_layers)
  return list(range(first, m.num_layers, m.moe_layer_freq))


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
