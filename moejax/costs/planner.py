"""What a configuration costs on a device mesh, read off the model definition with nothing
allocated: per-device weight, optimizer-state and KV-cache memory, the devices it needs, and the
all-to-all traffic that expert parallelism implies.

Used by `python -m moejax.params --config=... --mesh=expert=64,tensor=8 --device_memory=80`.
Every shape comes from `jax.eval_shape` of the real `Transformer`; the sharding of each weight
comes from its logical axes and `parallel.sharding.LOGICAL_RULES`, so the plan follows the code.
Not counted: activations (they depend on batch, remat and sequence length), framework overhead.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from moejax.errors import ConfigError
from moejax.model.schedule import moe_layer_ids
from moejax.model.transformer import Transformer
from moejax.parallel.mesh import MESH_AXES
from moejax.parallel.sharding import LOGICAL_RULES

BYTES = {'bf16': 2, 'fp8': 1}
# Mixed-precision AdamW training, per parameter: weights and gradients in the compute dtype,
# an fp32 master copy and two fp32 moments (the ZeRO paper's 16 bytes at bf16).
MASTER_AND_MOMENTS = 12
USABLE = 0.9  # share of device memory a plan may fill (allocator slack, compiled buffers).


def parse_mesh(text: str) -> dict[str, int]:
  sizes = {a: 1 for a in MESH_AXES}
  for item in filter(None, (s.strip() for s in text.split(','))):
    name, _, value = item.partition('=')
    if name not in sizes or not value.isdigit() or int(value) < 1:
      raise ConfigError(f'--mesh={text!r}: write axis=size pairs such as expert=64,tensor=8 '
                        f'with axes from {list(MESH_AXES)} and positive sizes (bad: {item!r})')
    sizes[name] = int(value)
  return sizes


def _shard_elements(shape, names, mesh: dict[str, int]) -> int:
  """Elements one device holds of an array whose dims carry these logical names, split as
  flax's logical_to_mesh_axes maps them with LOGICAL_RULES (the code's own sharding)."""
  spec = nn.logical_to_mesh_axes(tuple(names), LOGICAL_RULES) if names else (None,) * len(shape)
  n = 1
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    n *= -(-dim // math.prod(mesh[a] for a in axes))  # an uneven split pads the last shard
  return n


def _abstract(model_cfg, cache_len: int = 0):
  model = Transformer(ml_collections.FrozenConfigDict(model_cfg), train=False, cache_len=cache_len)
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32),
                        jnp.zeros((1, 1), jnp.int32))


def weight_elements_per_device(model_cfg, mesh: dict[str, int]) -> tuple[int, int]:
  """(elements per device, total elements) of the main model's weights (MTP excluded)."""
  boxed = _abstract(model_cfg)['params']
  per_device = total = 0
  leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(
      x, nn.Partitioned))
  for path, leaf in leaves:
    if any(getattr(p, 'key', '').startswith('mtp_') for p in path if hasattr(p, 'key')):
      continue
    names = leaf.names if isinstance(leaf, nn.Partitioned) else None
    shape = (leaf.value if isinstance(leaf, nn.Partitioned) else leaf).shape
    per_device += _shard_elements(shape, names, mesh)
    total += math.prod(shape)
  return per_device, total


def train_state_bytes_per_device(model_cfg, mesh: dict[str, int]) -> int:
  """Bytes of moejax's own train state one device holds: the parameters in float32 and AdamW's
  two float32 moments (12 bytes per parameter, MTP modules included), split by the logical
  rules. `python -m moejax.compile` sets it beside the compiled program's state."""
  boxed = _abstract(model_cfg)['params']
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  elements = sum(_shard_elements((leaf.value if isinstance(leaf, nn.Partitioned) else leaf).shape,
                                 leaf.names if isinstance(leaf, nn.Partitioned) else None, mesh)
                 for leaf in leaves)
  return elements * 12


def cache_numbers(model_cfg) -> tuple[int, int, int]:
  """(numbers cached per token over all layers, convolution inputs per sequence in the model
  dtype, gated delta states per sequence in float32), read from the decoding model's cache.
  Per token: GQA 2 * kv_heads * head_dim per layer, MLA kv_lora_rank + qk_rope_head_dim (and
  the sparse-attention indexer's key, index_head_dim);
  linear-attention layers keep only their per-sequence state, whatever the context."""
  cache = _abstract(model_cfg, cache_len=1)['cache']
  per_token = conv = state = 0
  for path, x in jax.tree_util.tree_leaves_with_path(cache):
    name, size = getattr(path[-1], 'key', ''), math.prod(x.shape)
    if x.ndim < 2:
      continue
    if name == 'state':
      state += size
    elif name.endswith('_state'):
      conv += size
    else:
      per_token += size
  return per_token, conv, state


def kv_cache_numbers_per_token(model_cfg) -> int:
  """cache_numbers' numbers cached per token."""
  return cache_numbers(model_cfg)[0]


def expected_devices_reached(num_experts: int, top_k: int, ep: int, limit: int = 0) -> float:
  """Expected number of distinct expert-parallel ranks a token's top-K experts live on, with
  experts spread evenly and chosen uniformly (the balanced-load case); `limit` caps it (V2/V3
  device- or node-limited routing, M)."""
  if ep <= 1:
    return 1.0
  per_rank = num_experts // ep
  miss = math.comb(num_experts - per_rank, top_k) / math.comb(num_experts, top_k)
  reached = ep * (1 - miss)
  return min(reached, limit) if limit else reached


def all_to_all(model_cfg, mesh: dict[str, int], tokens_per_device: int, dtype: str) -> dict:
  """Bytes one token and one device send per MoE layer for dispatch + combine. A token is sent
  once to each remote rank holding one of its experts (and its output comes back once): the
  deduplicated scheme of DeepSeek-V3; without dedup multiply by K / reached."""
  moe, r = model_cfg.moe, model_cfg.moe.router
  ep = mesh['expert']
  limit = r.topk_groups if r.num_groups > 1 and r.num_groups == ep else 0
  reached = expected_devices_reached(moe.num_experts, moe.num_experts_per_tok, ep, limit)
  remote = reached * (ep - 1) / ep if ep > 1 else 0.0  # the home rank's copy stays local
  per_token = 2 * remote * model_cfg.d_model * BYTES[dtype]
  layers = len(moe_layer_ids(model_cfg))
  ring = ring_bytes_per_token(model_cfg, ep, dtype)
  return {'expert_ranks_reached_per_token': round(reached, 3),
          'a2a_bytes_per_token_per_layer': round(per_token),
          'a2a_bytes_per_device_per_layer': round(per_token * tokens_per_device),
          'a2a_bytes_per_token_all_layers': round(per_token * layers),
          'ring_bytes_per_token_per_layer': round(ring),
          'ring_bytes_per_device_per_layer': round(ring * tokens_per_device),
          'ragged_bytes_per_token_per_layer': round(ragged_bytes_per_token(model_cfg, ep, dtype)),
          'moe_layers': layers}


def ragged_bytes_per_token(model_cfg, ep: int, dtype: str) -> float:
  """Bytes per token and MoE layer of the exact-size exchange (dispatch 'ragged_all_to_all'):
  each of the K (token, expert) pairs goes to its expert's rank and back, not deduplicated;
  a pair stays home with probability 1 / EP under uniform routing."""
  k = model_cfg.moe.num_experts_per_tok
  return 2 * k * (ep - 1) / ep * model_cfg.d_model * BYTES[dtype]


def ring_bytes_per_token(model_cfg, ep: int, dtype: str) -> float:
  """Bytes a device sends per token of its own, per MoE layer, in the ring of experts (dispatch
  'ring'): the all-gather passes each token's activations, K expert ids and K gates (int32,
  float32) to the EP - 1 other ranks, and the reduce-scatter returns EP - 1 partial outputs
  of every token: (EP - 1) (2 D b + 8 K), whatever the routing (ring algorithms)."""
  k = model_cfg.moe.num_experts_per_tok
  return (ep - 1) * (2 * model_cfg.d_model * BYTES[dtype] + 8 * k)


def plan(model_cfg, mesh: dict[str, int], device_memory_gib: float, context: int,
         decode_batch: int, tokens_per_device: int) -> dict:
  devices = math.prod(mesh.values())
  moe = model_cfg.moe
  if moe.num_experts % mesh['expert']:
    raise ConfigError(f"--mesh expert={mesh['expert']}: must divide model.moe.num_experts="
                      f'{moe.num_experts}; pick a divisor')
  shard, total = weight_elements_per_device(model_cfg, mesh)
  kv_per_token, conv_numbers, state_numbers = cache_numbers(model_cfg)
  budget = device_memory_gib * 2**30 * USABLE
  batch_split = mesh['data'] * mesh['fsdp'] * mesh['expert']
  # The cache splits over the batch axes (no further than one sequence per device); MLA's latent
  # is shared by all heads, so tensor parallelism does not split it, while GQA's splits by head.
  kv_split = min(batch_split, decode_batch) * (mesh['tensor'] if model_cfg.attention == 'gqa'
                                               else 1)
  gib = lambda b: round(b / 2**30, 2)  # noqa: E731
  out = {'mesh': mesh, 'devices': devices, 'device_memory_gib': device_memory_gib,
         'usable_fraction': USABLE, 'kv_numbers_per_token_per_layer':
         kv_per_token / model_cfg.num_layers, 'kv_numbers_per_token': kv_per_token,
         'recurrent_numbers_per_sequence': conv_numbers + state_numbers,
         'context': context, 'decode_batch': decode_batch}
  for dtype, nbytes in BYTES.items():
    kv_total = ((kv_per_token * context + conv_numbers) * nbytes + state_numbers * 4) * (
        decode_batch)
    weights, kv = shard * nbytes, kv_total / kv_split
    train = shard * (2 * nbytes + MASTER_AND_MOMENTS)
    out[dtype] = {
        'weights_gib_per_device': gib(weights), 'kv_cache_gib_per_device': gib(kv),
        'train_state_gib_per_device': gib(train),
        'inference_fits': weights + kv <= budget, 'training_fits': train <= budget,
        # Ideal sharding (every byte split evenly): a lower bound on the devices needed.
        'min_devices_inference': math.ceil((total * nbytes + kv_total) / budget),
        'min_devices_training': math.ceil(total * (2 * nbytes + MASTER_AND_MOMENTS) / budget),
        **all_to_all(model_cfg, mesh, tokens_per_device, dtype)}
  return out
