"""Config name -> implementation, for routers and dispatchers, and the MoE part of config
validation, derived from what each piece declares.

Adding a router: write its module under moe/routers/ (a `Router` returning a RouterOutput, with
its `READS`, and `check` / `causal` / `uses_dispatch` if the defaults do not fit), add one entry
to ROUTERS, and its tests. Adding a dispatcher: a `Dispatcher` dataclass whose fields are
config fields of model.moe.dispatch, one entry in DISPATCHERS. The MoE layer only ever goes
through make_router and make_dispatcher; config.validate through check.
"""
from __future__ import annotations

import dataclasses

from moejax.nn import names
from moejax.moe.dispatch import (CapacityDispatch, DroplessDispatch, EinsumDispatch,
                                 ExpertChoiceDispatch)
from moejax.moe.expert_parallel import AllToAllDispatch
from moejax.moe.experts import RoutedExperts
from moejax.moe.experts_mlp import MLPExperts
from moejax.moe.ragged import RaggedAllToAllDispatch
from moejax.moe.ring import RingDispatch
from moejax.moe.routers import (ExpertChoiceRouter, HashRouter, NoisyTopKRouter, ReLURouter,
                                 SinkhornRouter, TopKRouter, TopPRouter)

ROUTERS = {
    'topk': TopKRouter,
    'noisy_topk': NoisyTopKRouter,
    'hash': HashRouter,
    'sinkhorn': SinkhornRouter,
    'expert_choice': ExpertChoiceRouter,
    'top_p': TopPRouter,
    'relu': ReLURouter,
}

DISPATCHERS = {
    'capacity': CapacityDispatch,
    'einsum': EinsumDispatch,
    'all_to_all': AllToAllDispatch,
    'dropless': DroplessDispatch,
    'ring': RingDispatch,
    'ragged_all_to_all': RaggedAllToAllDispatch,
    'expert_choice': ExpertChoiceDispatch,  # chosen by the expert-choice router itself
}

# The routed expert blocks. A block has weights() (expert axis first) and shard(weights) -> an
# object with capacity(buffers), grouped(x_sorted, sizes) and dropless(x, index, gates, first)
# (experts.ExpertShard), which is all a dispatcher calls; its dataclass fields other than the
# shape are config fields of model.moe.experts; READS names those of its own (the kernel's,
# backend and block_size, are read by the dispatchers that run it), check(moe, fail) checks them.
EXPERTS = {
    'swiglu': RoutedExperts,
    'mlp': MLPExperts,
}

# Fields under model.moe every MoE layer reads, whichever pieces are chosen.
ALWAYS_READ = ('num_experts', 'expert_ffn_dim', 'num_shared_experts', 'shared_expert_ffn_dim',
               'shared_expert_gate', 'gate_input', 'router.name', 'experts.name')


def make_router(moe_cfg, vocab_size: int, batch: int = 1):
  cls = ROUTERS[moe_cfg.router.name]
  extra = {}
  if cls is HashRouter:
    extra['vocab_size'] = vocab_size
  if cls is ExpertChoiceRouter:
    extra['batch'] = batch
  return cls(num_experts=moe_cfg.num_experts, k=moe_cfg.num_experts_per_tok,
             cfg=moe_cfg.router, name=names.ROUTER, **extra)


def make_experts(moe_cfg, d_model: int, dtype):
  """The expert block of model.moe.experts, its settings from that section."""
  cls = EXPERTS[moe_cfg.experts.name]
  section = moe_cfg.experts
  settings = {f.name: section[f.name] for f in dataclasses.fields(cls)
              if f.name in section and f.name != 'name'}
  return cls(num_experts=moe_cfg.num_experts, d_model=d_model, d_ff=moe_cfg.expert_ffn_dim,
             dtype=dtype, name=names.EXPERTS, **settings)


def replaying_routers() -> list[str]:
  """The routers that can route as recorded in an earlier pass (Router.REPLAY)."""
  return [name for name, cls in ROUTERS.items() if cls.REPLAY]


def make_dispatcher(moe_cfg, name: str | None = None):
  """The dispatcher `name` (default: dispatch.name) built from its config section: the
  constructor is the schema."""
  cls = DISPATCHERS[name or moe_cfg.dispatch.name]
  d = moe_cfg.dispatch
  return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.init and f.name in d})


def _leaves(node, prefix=''):
  for key, value in node.items():
    if hasattr(value, 'items'):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def _get(node, dotted: str):
  for part in dotted.split('.'):
    node = node[part]
  return node


def check(config, fail, defaults):
  """The MoE part of validation: known names, each piece's own checks, and no field set away
  from its default (`defaults`: base_config().model.moe) that the chosen pieces do not read."""
  moe = config.model.moe
  if moe.router.name not in ROUTERS:
    fail('model.moe.router.name', moe.router.name, f'must be one of {list(ROUTERS)}')
  if moe.dispatch.name not in DISPATCHERS:
    fail('model.moe.dispatch.name', moe.dispatch.name, f'must be one of {list(DISPATCHERS)}')
  if moe.experts.name not in EXPERTS:
    fail('model.moe.experts.name', moe.experts.name, f'must be one of {list(EXPERTS)}')
  router, dispatcher = ROUTERS[moe.router.name], DISPATCHERS[moe.dispatch.name]
  block = EXPERTS[moe.experts.name]
  dispatches = router.uses_dispatch(moe, True) or router.uses_dispatch(moe, False)
  reads = set(ALWAYS_READ + router.reads(moe) + getattr(block, 'READS', ()))
  pieces = [f"the {moe.router.name!r} router", f"the {moe.experts.name!r} expert block"]
  if dispatches:
    reads |= {'dispatch.name', *dispatcher.reads()}
    pieces.insert(1, f"the {moe.dispatch.name!r} dispatcher")
  pieces = ', '.join(pieces[:-1]) + ' and ' + pieces[-1]
  for field, value in _leaves(moe):
    default = _get(defaults, field)
    if field not in reads and value != default and not _off(field, value):
      fail(f'model.moe.{field}', value, f'is not read by {pieces}; remove the setting (or set '
           f'--config.model.moe.{field}={default!r}, its default) or choose '
           f'{_piece_kind(field)} that reads it{_readers(field)}')
  router.check(moe, fail)
  if hasattr(block, 'check'):
    block.check(moe, fail)
  if dispatches:
    dispatcher.check(config, fail)


def _off(field: str, value) -> bool:
  """A loss weight, bias rate or L1 target of 0 turns its feature off, whichever pieces are
  chosen."""
  return (field.endswith('_weight') or field in ('balance.bias_update_rate',
                                                 'balance.l1_target')) and value == 0


def _piece_kind(field: str) -> str:
  if field.startswith('experts.') and any(field in getattr(c, 'READS', ()) for c in
                                          EXPERTS.values()):
    return 'an expert block'
  return 'a dispatcher' if field.startswith(('dispatch.', 'experts.')) else 'a router'


def _readers(field: str) -> str:
  """' (name, name)': the routers, dispatchers or expert blocks that read the field."""
  if field.startswith(('dispatch.', 'experts.')):
    names = [n for n, cls in DISPATCHERS.items() if field in cls.reads()]
    names += [n for n, cls in EXPERTS.items() if field in getattr(cls, 'READS', ())]
  else:
    names = [n for n, cls in ROUTERS.items() if field in cls.READS]
  return f" ({', '.join(names)})" if names else ''


def routing_is_causal(moe, train: bool) -> bool:
  """Whether a token's routed output ignores later tokens of the batch: the router's routing
  is causal and, if its routing goes through the dispatcher, so is the dispatcher's."""
  router = ROUTERS[moe.router.name]
  if not router.causal(moe, train):
    return False
  return not router.uses_dispatch(moe, train) or DISPATCHERS[moe.dispatch.name].causal(moe)
