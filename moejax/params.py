"""Parameter counts from the real model definition, with nothing allocated (jax.eval_shape).

python -m moejax.params --config=configs/deepseek_v3.py
Prints total and activated parameters of the main model (one token uses K of the N routed
experts), split by embedding / attention / dense FFN / routed experts / shared experts /
router / norms, and the multi-token-prediction modules apart ('mtp', not in the total), and
the FLOPs of one token at data.seq_len, forward and training (moejax/costs/flops.py).
With --mesh (and --device_memory, --context, --decode_batch, --tokens_per_device) it also plans
memory per device, devices needed and all-to-all bytes (moejax/costs/planner.py). Tables;
--json prints JSON lines (the counts, then the plan).
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
  p.add_argument('--json', action='store_true', help='print JSON lines (the counts, then '
                 'the plan with --mesh) instead of the tables')
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
  counts = {**count_params(config.model), 'seq_len': config.data.seq_len,
            'forward_flops_per_token': flops['forward'], 'train_flops_per_token': flops['train']}
  if args.json:
    print(json.dumps(counts))
    if planned is not None:
      print(json.dumps(planned))
  else:
    print(tables(counts, planned))
  return 0


PARTS = (('routed_experts', 'routed experts'), ('shared_experts', 'shared experts'),
         ('router', 'router'), ('dense_ffn', 'dense FFN'), ('attention', 'attention'),
         ('embedding', 'embedding (and head)'), ('norms', 'norms'))
PLAN = (('weights_gib_per_device', 'weights, GiB per device', '.2f'),
        ('kv_cache_gib_per_device', 'KV cache, GiB per device', '.2f'),
        ('train_state_gib_per_device', 'train state, GiB per device', '.2f'),
        ('inference_fits', 'inference fits', ''), ('training_fits', 'training fits', ''),
        ('min_devices_inference', 'devices needed, inference', 'd'),
        ('min_devices_training', 'devices needed, training', 'd'),
        ('expert_ranks_reached_per_token', 'expert ranks a token reaches', '.2f'),
        ('a2a_bytes_per_token_per_layer', 'all-to-all bytes per token and layer', ',d'),
        ('a2a_bytes_per_device_per_layer', 'all-to-all bytes per device and layer', ',d'))


def tables(counts: dict, planned: dict | None) -> str:
  """The counts (and the plan) as aligned text tables; --json has every number."""
  b = lambda n: f'{n / 1e9:,.3f}B' if n >= 1e8 else f'{n / 1e6:,.3f}M'  # noqa: E731
  rows = [('total', b(counts['total'])),
          ('activated per token', f"{b(counts['active'])} ("
           f"{b(counts['active_without_input_embedding'])} without the input embedding)")]
  rows += [(title, b(counts[k])) for k, title in PARTS if counts.get(k)]
  if counts.get('mtp'):
    rows.append(('multi-token prediction (not in the total)', b(counts['mtp'])))
  width = max(len(t) for t, _ in rows)
  lines = ['parameters:'] + [f'  {t:<{width}}  {v}' for t, v in rows]
  lines.append(f"FLOPs per token at seq_len {counts['seq_len']}: forward "
               f"{counts['forward_flops_per_token'] / 1e9:,.2f} G, training "
               f"{counts['train_flops_per_token'] / 1e9:,.2f} G")
  if planned:
    mesh = ', '.join(f'{k}={v}' for k, v in planned['mesh'].items())
    lines += ['', f"plan on {mesh} ({planned['devices']} devices of "
              f"{planned['device_memory_gib']:g} GiB, {planned['usable_fraction']:.0%} usable; "
              f"KV cache of {planned['decode_batch']} sequences x {planned['context']} tokens, "
              f"{planned['kv_numbers_per_token_per_layer']:g} numbers per token and layer):"]
    width = max(len(t) for _, t, _ in PLAN)
    lines.append(f"  {'':<{width}}  {'bf16':>14}  {'fp8':>14}")
    for key, title, fmt in PLAN:
      cells = []
      for dtype in ('bf16', 'fp8'):
        v = planned[dtype][key]
        cells.append(('yes' if v else 'no') if isinstance(v, bool) else format(v, fmt))
      lines.append(f'  {title:<{width}}  {cells[0]:>14}  {cells[1]:>14}')
  return '\n'.join(lines)


def main(argv=None) -> int:
  return cli.run(_main, argv)


if __name__ == '__main__':
  sys.exit(main())
