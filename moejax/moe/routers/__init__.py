"""Routers. Each module holds one family; `moe.registry` maps config names to them."""
from moejax.moe.types import RouterOutput
from moejax.moe.routers.expert_choice import ExpertChoiceRouter
from moejax.moe.routers.hashing import HashRouter
from moejax.moe.routers.noisy import NoisyTopKRouter
from moejax.moe.routers.relu import ReLURouter
from moejax.moe.routers.sinkhorn import SinkhornRouter
from moejax.moe.routers.top_p import TopPRouter
from moejax.moe.routers.topk import TopKRouter

__all__ = ['RouterOutput', 'TopKRouter', 'NoisyTopKRouter', 'HashRouter', 'SinkhornRouter',
           'ExpertChoiceRouter', 'TopPRouter', 'ReLURouter']
