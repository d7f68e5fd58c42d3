"""Parameter counts from the real model definition, with nothing allocated (jax.eval_shape).

python -m moejax.params --config=configs/deepseek_v3.py
Prints total and activated parameters of the main model (one token uses K of the N routed
experts), split by embedding / attention / dense FFN / routed experts / shared experts /
router / norms, and the multi-token-prediction modules apart ('mtp', not in the total), and
the FLOPs of one token at data.seq_len, forward and training (moejax/costs/flops.py).
With --mesh (and --device_memory, --context, --decode_batch, --tokens_per_device) it also prints
a second JSON line: memory per device, devices needed and all-to-all bytes
(moejax/costs/planner.py).
"""
from __future__ import annotations

import copy
import json
import math
import sys

from moejax import checks, cli
from moejax.costs.flops import flops_per_token
from moejax.costs.parameters import count_params
from moejax.costs.planner import parse_mesh, plan
from moejax.errors import ConfigError


def parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog='python -m moejax.params', description=__doc__.split('\n')[0])
  cli.add_config_args(p)
  p.add_argument('--mesh', default='', help='plan memory on this mesh, e.g. expert=64,tensor=8 '
                 '(axes data, fsdp, expert, tensor; unnamed axes are 1)')
  p.add_argument('--device_memory', type=float, default=80.0, help='GiB of memory per device')
  p.add_argument('--context', type=int, default=4096,
                 help='tokens per sequence held in the KV cache')
  p.add_argument('--decode_batch', type=int, default=32,
                 help='sequences decoded at once (KV cache)')
  p.add_argument('--tokens_per_device', type=int, default=4096, help='tokens each device '
                 'routes per MoE layer and step (for the all-to-all bytes per device)')
  return p


def _main(argv=None) -> int:
  args, config = cli.parse(parser(), argv)
  for name in ('device_memory', 'context', 'decode_batch', 'tokens_per_device'):
    value = getattr(args, name)
    if not (math.isfinite(value) and value > 0):
      raise ConfigError(f'--{name}={value}: must be a positive number')
  checked = copy.deepcopy(config)  # the model's fields; a plan's mesh comes from --mesh
  checked.mesh.data, checked.mesh.fsdp, checked.mesh.expert, checked.mesh.tensor = -1, 1, 1, 1
  checks.validate(checked, 1)
  flops = flops_per_token(config.model, config.data.seq_len)
  planned = None
  if args.mesh:  # before anything is printed: a mesh that does not fit the model is one line
    planned = plan(config.model, parse_mesh(args.mesh), args.device_memory, args.context,
                   args.decode_batch, args.tokens_per_device)
  print(json.dumps({**count_params(config.model), 'seq_len': config.data.seq_len,
                    'forward_flops_per_token': flops['forward'],
                    'train_flops_per_token': flops['train']}))
  if planned is not None:
    print(json.dumps(planned))
  return 0


def main(argv=None) -> int:
  return cli.run(_main, argv)


if __name__ == '__main__':
  sys.exit(main())
