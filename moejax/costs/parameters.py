"""Parameter counts from the real model definition, with nothing allocated (jax.eval_shape):
total and activated (one token uses K of the N routed experts), split by category."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from moejax.model.transformer import Transformer
from moejax.nn import names


# First matching path component decides the category.
_CATEGORIES = ((names.EXPERTS, 'routed_experts'), (names.SHARED, 'shared_experts'),
               (names.ROUTER, 'router'), (names.FFN, 'dense_ffn'), ('attn', 'attention'),
               ('embedding', 'embedding'), ('head', 'embedding'))


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
