"""Config name -> implementation, for routers and dispatchers.

Adding a router: write its module (returning a RouterOutput), add one entry here, and its
tests. The MoE layer only ever goes through these two functions.
"""
from __future__ import annotations

from moejax.moe.dispatch import CapacityDispatch, DroplessDispatch
from moejax.moe.routers import TopKRouter


def _topk(moe_cfg, num_experts, k):
  r = moe_cfg.router
  return TopKRouter(num_experts=num_experts, k=k, norm_topk_prob=r.norm_topk_prob,
                    dtype=r.dtype, name='router')


ROUTERS = {'topk': _topk}

DISPATCHERS = {
    'capacity': lambda d: CapacityDispatch(
        capacity_factor=d.capacity_factor, eval_capacity_factor=d.eval_capacity_factor,
        min_capacity=d.min_capacity, priority=d.priority),
    'dropless': lambda d: DroplessDispatch(),
}


def make_router(moe_cfg):
  return ROUTERS[moe_cfg.router.name](moe_cfg, moe_cfg.num_experts, moe_cfg.num_experts_per_tok)


def make_dispatcher(moe_cfg):
  return DISPATCHERS[moe_cfg.dispatch.name](moe_cfg.dispatch)
