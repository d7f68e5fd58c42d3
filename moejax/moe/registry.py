"""Config name -> implementation, for routers and dispatchers.

Adding a router: write its module under moe/routers/ (returning a RouterOutput), add one entry
here and its name to config.ROUTER_NAMES, and its tests. The MoE layer only ever goes through
these two functions.
"""
from __future__ import annotations

from moejax.moe.dispatch import CapacityDispatch, DroplessDispatch, EinsumDispatch
from moejax.moe.expert_parallel import AllToAllDispatch
from moejax.moe.ragged import RaggedAllToAllDispatch
from moejax.moe.ring import RingDispatch
from moejax.moe.routers import (ExpertChoiceRouter, HashRouter, NoisyTopKRouter, SinkhornRouter,
                                 TopKRouter)

ROUTERS = {
    'topk': TopKRouter,
    'noisy_topk': NoisyTopKRouter,
    'hash': HashRouter,
    'sinkhorn': SinkhornRouter,
    'expert_choice': ExpertChoiceRouter,
}

DISPATCHERS = {
    'capacity': lambda d: CapacityDispatch(
        capacity_factor=d.capacity_factor, eval_capacity_factor=d.eval_capacity_factor,
        min_capacity=d.min_capacity, priority=d.priority),
    'einsum': lambda d: EinsumDispatch(
        group_size=d.group_size, capacity_factor=d.capacity_factor,
        eval_capacity_factor=d.eval_capacity_factor, min_capacity=d.min_capacity,
        priority=d.priority),
    'all_to_all': lambda d: AllToAllDispatch(
        capacity_factor=d.capacity_factor, eval_capacity_factor=d.eval_capacity_factor,
        min_capacity=d.min_capacity, priority=d.priority),
    'dropless': lambda d: DroplessDispatch(),
    'ring': lambda d: RingDispatch(),
    'ragged_all_to_all': lambda d: RaggedAllToAllDispatch(),
}


def make_router(moe_cfg, vocab_size: int, batch: int = 1):
  cls = ROUTERS[moe_cfg.router.name]
  extra = {}
  if cls is HashRouter:
    extra['vocab_size'] = vocab_size
  if cls is ExpertChoiceRouter:
    extra['batch'] = batch
  return cls(num_experts=moe_cfg.num_experts, k=moe_cfg.num_experts_per_tok,
             cfg=moe_cfg.router, balance=moe_cfg.balance, name='router', **extra)


def make_dispatcher(moe_cfg):
  return DISPATCHERS[moe_cfg.dispatch.name](moe_cfg.dispatch)
