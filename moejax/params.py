"""Parameter counts from the real model definition, with nothing allocated (jax.eval_shape).

python -m moejax.params --config=configs/deepseek_v3.py
Prints total and activated parameters of the main model (one token uses K of the N routed
experts), split by embedding / attention / dense FFN / routed experts / shared experts /
router / norms, and the multi-token-prediction modules apart ('mtp', not in the total).
With --mesh (and --device-memory, --context, --decode-batch, --tokens-per-device) it also prints
a second JSON line: memory per device, devices needed and all-to-all bytes (moejax/planner.py).
"""
from __future__ import annotations

import copy
import json
import math
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from moejax import cli
from moejax.config import ConfigError, validate
from moejax.model.transformer import Transformer
from moejax.nn import names
from moejax.planner import parse_mesh, plan

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


def _main(argv=None) -> int:
  p = cli.ArgumentParser(prog='python -m moejax.params', description=__doc__.split('\n')[0])
  cli.add_config_args(p)
  p.add_argument('--mesh', default='', help='plan memory on this mesh, e.g. expert=64,tensor=8 '
                 '(axes data, fsdp, expert, tensor; unnamed axes are 1)')
  p.add_argument('--device-memory', type=float, default=80.0, help='GiB of memory per device')
  p.add_argument('--context', type=int, default=4096,
                 help='tokens per sequence held in the KV cache')
  p.add_argument('--decode-batch', type=int, default=32,
                 help='sequences decoded at once (KV cache)')
  p.add_argument('--tokens-per-device', type=int, default=4096, help='tokens each device '
                 'routes per MoE layer and step (for the all-to-all bytes per device)')
  args, config = cli.parse(p, argv)
  for name in ('device_memory', 'context', 'decode_batch', 'tokens_per_device'):
    value = getattr(args, name)
    if not (math.isfinite(value) and value > 0):
      raise ConfigError(f"--{name.replace('_', '-')}={value}: must be a positive number")
  checked = copy.deepcopy(config)  # the model's fields; a plan's mesh comes from --mesh
  checked.mesh.data, checked.mesh.fsdp, checked.mesh.expert, checked.mesh.tensor = -1, 1, 1, 1
  validate(checked, 1)
  print(json.dumps(count_params(config.model)))
  if args.mesh:
    mesh = parse_mesh(args.mesh)
    print(json.dumps(plan(config.model, mesh, args.device_memory, args.context,
                          args.decode_batch, args.tokens_per_device)))
  return 0


def main(argv=None) -> int:
  return cli.run(_main, argv)


if __name__ == '__main__':
  sys.exit(main())
