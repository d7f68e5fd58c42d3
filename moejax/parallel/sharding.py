"""The logical-axis rules that map named array dimensions onto the mesh (moejax/parallel/mesh.py),
and the shardings derived from them.

Modules name their dimensions ('batch', 'embed', 'expert', ...); these rules decide which mesh
axes shard them. Changing the parallelism of a run is a mesh change in the config, never a model
change.
"""
from __future__ import annotations

from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax.parallel.mesh import BATCH_AXES

# (logical name, mesh axes). Activations' batch is split over every non-tensor axis;
# parameters are split by fsdp on embed, by expert on the expert dim, by tensor on widths/heads.
LOGICAL_RULES = (
    ('batch', BATCH_AXES),
    ('length', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    # Before 'embed': flax applies the rules in this order, so the expert dimension of the
    # routed experts' weights takes the expert axis first.
    ('expert', 'expert'),
    # FSDP: the model dimension of every weight splits over 'fsdp' and, where the weight has
    # no expert dimension (which took the expert axis), over 'expert' too (an expert axis
    # holds the experts apart, and would otherwise keep a whole copy of the attention, dense
    # and shared weights on each of its devices). A rule whose axes are taken is skipped for
    # the next one.
    ('embed', ('fsdp', 'expert')),
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('q_lora', None),
    ('kv_lora', None),
    ('mlp', 'tensor'),
    ('expert_mlp', 'tensor'),
    ('router_expert', None),
    ('layers', None),
    ('norm', None),
)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows of a global batch split over the batch axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_shardings(boxed_tree, mesh: Mesh):
  """NamedShardings for a tree of (abstract) values carrying nn.Partitioned metadata."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)
