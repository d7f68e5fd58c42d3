"""Config name -> MoE piece, and the MoE part of config validation, derived from what each piece
declares.

The tables are filled by the pieces themselves: a router file under moe/routers/ registers its
class with @register('name'), a dispatcher under moe/dispatch/, an expert block under
moe/experts/. Each piece's settings are its dataclass fields, read from its config section (the
constructor is the schema); the fields it reads are derived from the class. The MoE layer only
ever goes through make_router, make_dispatcher and make_experts; checks.validate through check.
"""
from __future__ import annotations

import dataclasses

from moejax import kernels
from moejax.moe import balance, default_outputs, losses
from moejax.moe.dispatch import DISPATCHERS
from moejax.moe.experts import EXPERTS
from moejax.moe.routers import ROUTERS
from moejax.nn import names

__all__ = ['DISPATCHERS', 'EXPERTS', 'ROUTERS', 'check', 'make_dispatcher', 'make_experts',
           'make_router', 'replaying_routers', 'routing_is_causal']

# Fields under model.moe every MoE layer reads, whichever pieces are chosen.
ALWAYS_READ = ('num_experts', 'expert_ffn_dim', 'num_shared_experts', 'shared_expert_ffn_dim',
               'shared_expert_gate', 'gate_input', 'default_outputs_decay', 'router.name',
               'experts.name')


def make_router(moe, vocab_size: int):
  """The router of model.moe.router.name, its settings read from that section.

  Args:
    moe: the model.moe config.
    vocab_size: the model's vocabulary (context every router gets; hash routing uses it).
  Returns:
    the Router module (named names.ROUTER in the parameter tree).
  """
  cls = ROUTERS[moe.router.name]
  settings = {f: moe.router[f] for f in cls.settings()}
  return cls(num_experts=moe.num_experts, k=moe.num_experts_per_tok, vocab_size=vocab_size,
             name=names.ROUTER, **settings)


def make_experts(moe, d_model: int, dtype):
  """The expert block of model.moe.experts, its settings from that section."""
  cls = EXPERTS[moe.experts.name]
  section = moe.experts
  settings = {f.name: section[f.name] for f in dataclasses.fields(cls)
              if f.name in section and f.name != 'name'}
  return cls(num_experts=moe.num_experts, d_model=d_model, d_ff=moe.expert_ffn_dim,
             dtype=dtype, name=names.EXPERTS, **settings)


def make_dispatcher(moe, name: str | None = None):
  """The dispatcher `name` (default: dispatch.name) built from its config section."""
  cls = DISPATCHERS[name or moe.dispatch.name]
  d = moe.dispatch
  return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.init and f.name in d})


def _settings(kind: str) -> dict:
  """{piece name: {setting: default}} of every registered piece of a kind."""
  if kind == 'router':
    return {n: {f.name: f.default for f in dataclasses.fields(cls) if f.name in cls.settings()}
            for n, cls in ROUTERS.items()}
  if kind == 'dispatch':
    return {n: {f.name: f.default for f in dataclasses.fields(cls)
                if f'dispatch.{f.name}' in cls.reads()} for n, cls in DISPATCHERS.items()}
  return {n: {f.name: f.default for f in dataclasses.fields(cls)
              if f.name not in ('num_experts', 'd_model', 'd_ff', 'dtype', 'parent', 'name')}
          for n, cls in EXPERTS.items()}


def section_defaults(kind: str) -> dict:
  """The config section model.moe.<kind> ('router', 'dispatch', 'experts') without its name:
  every setting of every registered piece of that kind, with the default its class gives. A
  setting several pieces share must have one default."""
  out, owner = {}, {}
  for piece, settings in _settings(kind).items():
    for field, default in settings.items():
      if field in out and out[field] != default:
        raise ValueError(f'model.moe.{kind}.{field}: {owner[field]!r} defaults it to '
                         f'{out[field]!r}, {piece!r} to {default!r}; give it one default')
      out.setdefault(field, default)
      owner.setdefault(field, piece)
  return out


def replaying_routers() -> list[str]:
  """The routers that can route as recorded in an earlier pass (Router.REPLAY)."""
  return [name for name, cls in ROUTERS.items() if cls.REPLAY]


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


def _one_of(field: str, value, table: dict, fail):
  if value not in table:
    fail(f'model.moe.{field}', value, f'must be one of {sorted(table)}')


def check(config, fail, defaults):
  """The MoE part of validation: known names, each piece's own checks, and no field set away
  from its default (`defaults`: base_config().model.moe) that the chosen pieces do not read."""
  moe = config.model.moe
  _one_of('router.name', moe.router.name, ROUTERS, fail)
  _one_of('dispatch.name', moe.dispatch.name, DISPATCHERS, fail)
  _one_of('experts.name', moe.experts.name, EXPERTS, fail)
  router, dispatcher = ROUTERS[moe.router.name], DISPATCHERS[moe.dispatch.name]
  block = EXPERTS[moe.experts.name]
  dispatches = router.uses_dispatch(moe, True) or router.uses_dispatch(moe, False)
  reads = set(ALWAYS_READ + router.reads(moe) + getattr(block, 'READS', ()))
  pieces = [f"the {moe.router.name!r} router", f"the {moe.experts.name!r} expert block"]
  if dispatches:
    reads |= {'dispatch.name', *dispatcher.reads()}
    pieces.insert(1, f"the {moe.dispatch.name!r} dispatcher")
  pieces = ', '.join(pieces[:-1]) + ' and ' + pieces[-1]
  off = set(losses.switches()) | {'balance.bias_update_rate'}
  for field, value in _leaves(moe):
    default = _get(defaults, field)
    # A loss weight, bias rate or L1 target of 0 turns its feature off: always accepted.
    if field not in reads and value != default and not (field in off and value == 0):
      fail(f'model.moe.{field}', value, f'is not read by {pieces}; remove the setting (or set '
           f'--config.model.moe.{field}={default!r}, its default) or choose '
           f'{_piece_kind(field)} that reads it{_readers(field)}')
  balance.check(moe, fail)
  default_outputs.check(moe, fail)
  router.check(moe, fail)
  if hasattr(block, 'check'):
    block.check(moe, fail)
  if dispatches:
    if 'experts.backend' in reads:
      kernels.check(moe, fail)
    dispatcher.check(config, fail)


def _piece_kind(field: str) -> str:
  if field.startswith('experts.') and any(field in getattr(c, 'READS', ()) for c in
                                          EXPERTS.values()):
    return 'an expert block'
  return 'a dispatcher' if field.startswith(('dispatch.', 'experts.')) else 'a router'


def _readers(field: str) -> str:
  """' (name, name)': the routers, dispatchers or expert blocks that read the field."""
  if field.startswith(('dispatch.', 'experts.')):
    found = [n for n, cls in DISPATCHERS.items() if field in cls.reads()]
    found += [n for n, cls in EXPERTS.items() if field in getattr(cls, 'READS', ())]
  else:
    found = [n for n, cls in ROUTERS.items() if field in cls.reads()]
  return f" ({', '.join(sorted(found))})" if found else ''


def routing_is_causal(moe, train: bool) -> bool:
  """Whether a token's routed output ignores later tokens of the batch: the router's routing
  is causal and, if its routing goes through the dispatcher, so is the dispatcher's."""
  router = ROUTERS[moe.router.name]
  if not router.causal(moe, train):
    return False
  return not router.uses_dispatch(moe, train) or DISPATCHERS[moe.dispatch.name].causal(moe)
