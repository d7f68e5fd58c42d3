"""Parameter counts from the real model definition, with nothing allocated.

python -m moejax.params --config=configs/quickstart.py
Total counts every parameter; active counts what one token uses (K of the N routed experts).
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


def count_params(model_cfg) -> dict:
  model = Transformer(ml_collections.FrozenConfigDict(model_cfg))
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  total = routed = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes['params']):
    n = int(np.prod(leaf.shape))
    total += n
    if any(getattr(p, 'key', None) == 'experts' for p in path):
      routed += n
  moe = model_cfg.moe
  active = total - routed + routed * moe.num_experts_per_tok // moe.num_experts
  return {'total': total, 'routed_experts': routed, 'active': active}


def main(argv):
  del argv
  print(json.dumps(count_params(_CONFIG.value.model)))


if __name__ == '__main__':
  app.run(main)
