"""Device mesh and the logical-axis rules that map named array dimensions onto it.

Modules name their dimensions ('batch', 'embed', 'expert', ...); these rules decide which mesh
axes shard them. Changing the parallelism of a run is a mesh change in the config, never a model
change.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax.config import MESH_AXES

BATCH_AXES = ('data', 'fsdp', 'expert')


def batch_axes_in_trace() -> tuple[tuple[str, ...], int]:
  """The batch axes of the mesh being traced under (none outside a mesh) and how many
  groups of devices they split the batch into."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in BATCH_AXES if not mesh.empty and a in mesh.axis_names)
  return axes, int(np.prod([mesh.shape[a] for a in axes]))

# (logical name, mesh axes). Activations' batch is split over every non-tensor axis;
# parameters are split by fsdp on embed, by expert on the expert dim, by tensor on widths/heads.
LOGICAL_RULES = (
    ('batch', BATCH_AXES),
    ('length', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('q_lora', None),
    ('kv_lora', None),
    ('mlp', 'tensor'),
    ('expert', 'expert'),
    ('expert_mlp', 'tensor'),
    ('router_expert', None),
    ('layers', None),
    ('norm', None),
)


def make_mesh(sizes: dict[str, int], devices=None) -> Mesh:
  devices = np.asarray(devices if devices is not None else jax.devices())
  shape = tuple(sizes[a] for a in MESH_AXES)
  return Mesh(devices.reshape(shape), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_shardings(boxed_tree, mesh: Mesh):
  """NamedShardings for a tree of (abstract) values carrying nn.Partitioned metadata."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)
