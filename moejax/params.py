"""Parameter counts from the real model definition, with nothing allocated (jax.eval_shape).

python -m moejax.params --config=configs/deepseek_v3.py
Prints total and activated parameters of the main model (one token uses K of the N routed
experts), split by embedding / attention / dense FFN / routed experts / shared experts /
router / norms, and the multi-token-prediction modules apart ('mtp', not in the total).
With --mesh (and --device-memory, --context, --decode-batch, --tokens-per-device) it also prints
a second JSON line: memory per device, devices needed and all-to-all bytes (moejax/planner.py).
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import linen as nn
from ml_collections import config_flags

from moejax.model.transformer import Transformer
from moejax.planner import parse_mesh, plan

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file.')
_MESH = flags.DEFINE_string('mesh', '', 'Plan memory on this mesh, e.g. expert=64,tensor=8 '
                            '(axes data, fsdp, expert, tensor; unnamed axes are 1).')
_MEMORY = flags.DEFINE_float('device-memory', 80.0, 'GiB of memory per device.')
_CONTEXT = flags.DEFINE_integer('context', 4096, 'Tokens per sequence held in the KV cache.')
_BATCH = flags.DEFINE_integer('decode-batch', 32, 'Sequences decoded at once (KV cache).')
_TOKENS = flags.DEFINE_integer('tokens-per-device', 4096, 'Tokens each device routes per MoE '
                               'layer and step (for the all-to-all bytes per device).')

# First matching path component decides the category.
_CATEGORIES = (('experts', 'routed_experts'), ('shared', 'shared_experts'), ('router', 'router'),
               ('ffn', 'dense_ffn'), ('attn', 'attention'), ('embedding', 'embedding'),
               ('head', 'embedding'))


def _category(path) -> str:
  keys = [getattr(p, 'key', None) for p in path]
  if any(isinstance(k, str) and k.startswith('mtp_') for k in keys):
    return 'mtp'  # reported apart from the main model's total, as the papers do
  for key, name in _CATEGORIES:
    if key in keys:
      return name
  return 'norms'


def count_params(model_cfg) -> dict:
  model = Transformer(ml_collections.FrozenConfigDict(model_cfg))
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  split = {name: 0 for _, name in _CATEGORIES}
  split['norms'] = split['mtp'] = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes['params']):
    split[_category(path)] += int(np.prod(leaf.shape))
  total = sum(v for k, v in split.items() if k != 'mtp')
  moe = model_cfg.moe
  unused = split['routed_experts'] * (moe.num_experts - moe.num_experts_per_tok) // moe.num_experts
  active = total - unused
  # A token reads one row of the input embedding table (a lookup, not a matmul). DeepSeek-V2/V3
  # quote activated parameters without that table, DeepSeekMoE and Mixtral with it.
  table = 0 if model_cfg.tie_embeddings else model_cfg.vocab_size * model_cfg.d_model
  return {'total': total, 'active': active,
          'active_without_input_embedding': active - table + model_cfg.d_model, **split}


def main(argv):
  del argv
  model_cfg = _CONFIG.value.model
  print(json.dumps(count_params(model_cfg)))
  if _MESH.value:
    mesh = parse_mesh(_MESH.value)
    print(json.dumps(plan(model_cfg, mesh, _MEMORY.value, _CONTEXT.value, _BATCH.value,
                          _TOKENS.value)))


if __name__ == '__main__':
  app.run(main)
