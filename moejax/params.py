"""Parameter counts from the real model definition, with nothing allocated (jax.eval_shape).

python -m moejax.params --config=configs/deepseek_v3.py
Prints total and activated parameters of the main model (one token uses K of the N routed
experts), split by embedding / attention / dense FFN / routed experts / shared experts /
router / norms, and the multi-token-prediction modules apart ('mtp', not in the total).
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from flax import linen as nn
from ml_collections import config_flags

from moejax.model.transformer import Transformer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file.')

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
  return {'total': total, 'active': total - unused, **split}


def main(argv):
  del argv
  print(json.dumps(count_params(_CONFIG.value.model)))


if __name__ == '__main__':
  app.run(main)
