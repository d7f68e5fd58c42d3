"""Compile a config's programs (the train step, the eval step, the decode step) for a TPU
topology with XLA's TPU compiler, on compile-only devices, and read what the pod would run:
memory per chip by kind, the collectives, the compiler's cost analysis, compile time.

The mesh comes from the config (`mesh.*`, one axis may be -1) laid over the topology's chips
with jax's topology-aware `mesh_utils`; with several slices the 'data' axis spans them (or the
axes `mesh.dcn_*` name; their outer factor crosses the data-center network, reported as the
axis 'dcn').
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax import checks
from moejax.compile import chips, hlo
from moejax.errors import ConfigError
from moejax.parallel.mesh import BATCH_AXES, MESH_AXES, dcn_shape, device_grid, mesh_shape
from moejax.training.step import Trainer

PROGRAMS = ('train', 'eval', 'decode')


@dataclasses.dataclass
class Target:
  """A config's mesh on a topology's compile-only chips."""
  topology: chips.Topology
  mesh: Mesh
  sizes: dict  # {axis: size} over MESH_AXES
  dcn: dict  # {axis: slices it spans} over MESH_AXES

  @property
  def hlo_axes(self) -> dict:
    """The mesh as the HLO's device groups see it: one slice's (each axis divided by the
    slices it spans; what crosses slices is reported over 'dcn')."""
    return {a: n // self.dcn[a] for a, n in self.sizes.items()}


def target(config, topology: chips.Topology) -> Target:
  """Validate config for the topology's chips and lay its mesh over them (ConfigError first)."""
  devices = chips.devices(topology)
  sizes = mesh_shape(config.mesh, len(devices))
  dcn = dcn_shape(config.mesh, sizes, devices)
  mesh = Mesh(device_grid(sizes, dcn, devices), MESH_AXES)
  # The compile reads no data: check the config as if it trained on the stdlib corpus, so a
  # run's prepared corpus need not be on this machine. Under the target's mesh, so the checks
  # see its platform (e.g. ragged all-to-all is refused on CPU only).
  checked = copy.deepcopy(config)
  checked.data.source, checked.data.prepared_dir, checked.data.mixture = 'stdlib', '', ''
  checked.data.eval_sets = ''
  with jax.set_mesh(mesh):
    checks.validate(checked, len(devices))
  return Target(topology, mesh, sizes, dcn)


def _sharded_bytes(abstract_tree) -> int:
  """Bytes one chip holds of a tree of ShapeDtypeStructs with shardings."""
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
  return total


@dataclasses.dataclass
class Compiled:
  """What the compiler said about one program."""
  program: str
  fits: bool
  compile_s: float
  memory: dict  # bytes per chip by kind
  cost: dict  # XLA's cost analysis (flops, bytes accessed), per chip
  collectives: list  # hlo.Collective
  oom: dict | None = None  # the compiler's out-of-memory numbers
  hlo_text: str = ''


def _abstract_batch(trainer: Trainer, config, batch: int | None = None) -> dict:
  b = config.train.batch_size if batch is None else batch
  spec = jax.ShapeDtypeStruct((b, config.data.seq_len), jnp.int32,
                              sharding=trainer.batch_sharding)
  return {'inputs': spec, 'targets': spec}


def _lower(trainer: Trainer, config, program: str, decode_batch: int, cache_len: int):
  state = trainer.abstract_state
  if program == 'train':
    return trainer.lower_train_step(state, _abstract_batch(trainer, config))
  with trainer.context():
    if program == 'eval':
      return trainer._eval_step.lower(state.params, state.model_state,
                                      _abstract_batch(trainer, config))
    return _lower_decode(trainer, config, decode_batch, cache_len)


def _lower_decode(trainer: Trainer, config, batch: int, cache_len: int):
  """One decoding step of `batch` sequences (one new token each) against a KV cache of
  cache_len positions: the program `python -m moejax.generate` runs per token."""
  from moejax.generate import decode, decoding_model
  model = decoding_model(config.model, cache_len)
  mesh = trainer.mesh
  groups = math.prod(mesh.shape[a] for a in BATCH_AXES)
  rows = P(BATCH_AXES) if batch % groups == 0 else P()
  tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=NamedSharding(mesh, rows))
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch, 1), jnp.int32),
                                            jnp.zeros((batch, 1), jnp.int32)))
  cache = jax.tree.map(lambda s: jax.ShapeDtypeStruct(
      s.shape, s.dtype, sharding=NamedSharding(mesh, rows if s.ndim and s.shape[0] == batch
                                               else P())), nn.unbox(boxed['cache']))
  variables = {'params': trainer.abstract_state.params, **trainer.abstract_state.model_state}
  return decode.lower(model, variables, cache, tokens, tokens)


def compile_program(trainer: Trainer, config, program: str, target: Target,
                    decode_batch: int = 0, cache_len: int = 0, keep_hlo: bool = False
                    ) -> Compiled:
  """Lower and compile `program` ('train', 'eval' or 'decode') for the target's chips."""
  start = time.perf_counter()
  lowered = _lower(trainer, config, program, decode_batch or config.train.batch_size,
                   cache_len or config.data.seq_len)
  state = trainer.abstract_state
  memory = {'parameters': _sharded_bytes(state.params),
            'optimizer_state': _sharded_bytes(state.opt_state) if program == 'train' else 0,
            'model_state': _sharded_bytes(state.model_state)}
  # A compile-only executable cannot be stored in (or read from) jax's persistent cache.
  cached = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 (XLA raises its own runtime error type)
    oom = chips.parse_oom(str(e))
    if oom is None:
      raise
    return Compiled(program, False, time.perf_counter() - start, memory, {}, [], oom)
  finally:
    jax.config.update('jax_enable_compilation_cache', cached)
  seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  memory.update(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes,
                generated_code=m.generated_code_size_in_bytes)
  # The sum of the buffers: the arguments, the outputs that do not reuse (alias) an argument's
  # buffer, the temporaries and the program itself. An upper bound on the peak: the compiler
  # may place temporaries in donated arguments' buffers once they are dead, so a program can
  # fit (the compiler accepts it) with a sum above the usable HBM.
  memory['total'] = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                     + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  text = compiled.as_text()
  found = hlo.collectives(text, target.hlo_axes, target.topology.slices)
  return Compiled(program, True, seconds, memory,
                  {k: float(v) for k, v in cost.items() if k in ('flops', 'bytes accessed',
                                                                 'transcendentals')},
                  found, None, text if keep_hlo else '')


def compile_config(config, topology: chips.Topology, programs=('train',), decode_batch: int = 0,
                   cache_len: int = 0, keep_hlo: bool = False) -> tuple[Target, list[Compiled]]:
  """Compile each program of config for the topology (ConfigError before any compile)."""
  t = target(config, topology)
  trainer = Trainer(config, t.mesh)
  return t, [compile_program(trainer, config, p, t, decode_batch, cache_len, keep_hlo)
             for p in programs]
