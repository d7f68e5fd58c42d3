"""Benchmarks, one JSON object per line:
  python -m moejax.bench moe --json     the MoE layer against the dense FFN (bench/moe.py)
  python -m moejax.bench train --json   the whole train step, MoE against dense (bench/train.py)
  python -m moejax.bench data --json    the input pipeline against the train step (bench/data.py)
  python -m moejax.bench accelerator --json --out=DIR   one check of a GPU or TPU (or the CPU at
                                        small shapes): numerics, the layer, a train step, MFU
"""
from __future__ import annotations

import json
import sys

from moejax import cli


def parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog='python -m moejax.bench', description=__doc__.split('\n')[0])
  sub = p.add_subparsers(dest='what', required=True, metavar='{moe,train,data,accelerator}',
                         help='moe: the MoE layer; train: the whole train step; data: the input '
                         'pipeline; accelerator: one check of this machine')
  m = sub.add_parser('moe', help='MoE layer vs dense FFN, forward + backward',
                     formatter_class=cli.HelpFormatter)
  m.add_argument('--tokens', type=int, default=8192, help='tokens per call')
  m.add_argument('--seq', type=int, default=512, help='tokens per sequence')
  m.add_argument('--d_model', type=int, default=512, help='model width')
  m.add_argument('--experts', type=int, default=64, help='routed experts')
  m.add_argument('--expert_dim', type=int, default=256, help='width of each expert')
  m.add_argument('--top_k', type=int, default=6, help='experts per token')
  m.add_argument('--shared', type=int, default=1, help='shared experts')
  m.add_argument('--dtype', default='float32', help='compute dtype: float32 or bfloat16')
  m.add_argument('--block_size', type=int, default=0,
                 help='rows per block of the blocked kernel; 0: automatic (the config default)')
  m.add_argument('--capacity_factors', type=float, nargs='*', default=[1.25],
                 help='one capacity-dispatch row per factor')
  m.add_argument('--ragged_dot', action='store_true',
                 help='also time the ragged_dot backend (jax.lax.ragged_dot; very slow on CPU)')
  m.add_argument('--tokamax', action='store_true',
                 help="also time the tokamax backend (needs the kernels extra)")
  m.add_argument('--routing', default='learned', choices=('learned', 'balanced', 'random'),
                 help="the MoE rows' routing: the router's (learned), or forced: every expert "
                 'the same load (balanced) or uniform random experts (random)')
  m.add_argument('--group_size', type=int, default=512,
                 help='einsum (GShard) path tokens per group; 0 skips it')
  m.add_argument('--hf', action='store_true', help="also time Hugging Face's DeepSeek-V3 MoE "
                 'block (grouped_mm and eager experts; needs the torch extra)')
  m.add_argument('--meshes', nargs='*', default=['expert=8', 'data=2,expert=4', 'expert=64'],
                 help='meshes for the all-to-all rows')
  m.add_argument('--reps', type=int, default=3, help='timed runs per case (the median)')
  m.add_argument('--json', action='store_true', help='one JSON object per line (the only output)')
  tr = sub.add_parser('train', help='whole train step: MoE vs dense of equal active params',
                      formatter_class=cli.HelpFormatter)
  tr.add_argument('--batch', type=int, default=16, help='sequences per step')
  tr.add_argument('--seq', type=int, default=128, help='tokens per sequence')
  tr.add_argument('--d_model', type=int, default=128, help='model width')
  tr.add_argument('--heads', type=int, default=4, help='attention heads')
  tr.add_argument('--layers', type=int, default=4, help='layers (all MoE, or all dense)')
  tr.add_argument('--experts', type=int, default=16, help='routed experts')
  tr.add_argument('--expert_dim', type=int, default=64, help='width of each expert')
  tr.add_argument('--top_k', type=int, default=4, help='experts per token')
  tr.add_argument('--shared', type=int, default=1, help='shared experts')
  tr.add_argument('--block_size', type=int, default=0,
                  help='rows per block of the blocked kernel; 0: automatic (the config default)')
  tr.add_argument('--dispatches', nargs='+', default=['dropless', 'capacity', 'einsum'],
                  help='one MoE row per dispatch path')
  tr.add_argument('--depths', type=int, nargs='*', default=[4, 16, 64],
                  help='layer counts whose compile time is measured')
  tr.add_argument('--reps', type=int, default=5, help='timed steps per case (the median)')
  tr.add_argument('--json', action='store_true', help='one JSON object per line (the only output)')
  d = sub.add_parser('data', help='input pipeline tokens/s against what the train step uses',
                     formatter_class=cli.HelpFormatter)
  d.add_argument('--config', default='quickstart', help='the batch, sequence and model')
  d.add_argument('--prepared_dir', default='',
                 help='prepared shards to read (empty: the stdlib, prepared in a temp folder)')
  d.add_argument('--batches', type=int, default=200, help='batches timed per loader')
  d.add_argument('--reps', type=int, default=5, help='timed train steps (the median)')
  d.add_argument('--json', action='store_true', help='one JSON object per line (the only output)')
  acc = sub.add_parser('accelerator', help='one check of this machine: numerics of every '
                       'path and backend, the MoE layer and a ~100M-parameter train step at '
                       'bfloat16 with MFU (small shapes on CPU)', formatter_class=cli.HelpFormatter)
  acc.add_argument('--out', required=True, help='folder for accelerator.json and accelerator.md')
  acc.add_argument('--small', action='store_true',
                   help='the small (CPU) shapes on an accelerator too')
  acc.add_argument('--no_tests', action='store_true',
                   help='skip running the tests marked accelerator (pytest -m accelerator)')
  acc.add_argument('--json', action='store_true', help='one JSON object per line (the only output '
                   'besides the files)')
  return p


def _main(argv=None):
  p = parser()
  a = p.parse_args(argv)
  if a.what == 'train':
    return _train(p, a)
  if a.what == 'data':
    return _data(p, a)
  if a.what == 'accelerator':
    from moejax.bench import accelerator
    accelerator.run(a.out, small=True if a.small else None, tests=not a.no_tests,
                    command='python -m moejax.bench ' + ' '.join(argv or sys.argv[1:]))
    print(f"tables: {a.out}/accelerator.md, rows: {a.out}/accelerator.json", file=sys.stderr)
    return 0
  for name in ('tokens', 'seq', 'd_model', 'experts', 'expert_dim', 'top_k', 'reps'):
    if getattr(a, name) < 1:
      p.error(f'--{name}={getattr(a, name)} must be at least 1')
  if a.shared < 0 or a.group_size < 0 or a.block_size < 0:
    p.error('--shared, --group_size and --block_size must be >= 0')
  if a.top_k > a.experts:
    p.error(f'--top_k={a.top_k} exceeds --experts={a.experts}')
  if a.tokamax:
    from moejax import kernels
    if not kernels.available('tokamax'):
      p.error("--tokamax: tokamax is not installed (pip install 'moejax[kernels]')")
  if a.dtype not in ('float32', 'bfloat16'):
    p.error(f"--dtype={a.dtype}: use float32 or bfloat16")
  if any(not f > 0 for f in a.capacity_factors):
    p.error('--capacity_factors must be positive')
  if a.tokens % a.seq and a.tokens > a.seq:
    p.error(f'--tokens={a.tokens} must be a multiple of --seq={a.seq}')
  from moejax.costs.planner import parse_mesh
  for spec in a.meshes:
    parse_mesh(spec)
  ours = {}
  from moejax.bench.moe import all_to_all_rows, bench_moe
  for row in bench_moe(a):
    ours[row['case']] = row['ms']
    print(json.dumps(row), flush=True)
  if a.hf:
    from moejax.bench.hf import bench_hf
    for row in bench_hf(a):
      if row['case'] != 'hf_torch_dense_ffn':  # how much faster each of our paths runs
        row['moejax_speedup'] = {k: round(row['ms'] / v, 2) for k, v in ours.items()
                                 if k != 'dense_ffn'}
      print(json.dumps(row), flush=True)
  for row in all_to_all_rows(a):
    print(json.dumps(row), flush=True)


def _train(p, a):
  for name in ('batch', 'seq', 'd_model', 'heads', 'layers', 'experts', 'expert_dim', 'top_k',
               'reps'):
    if getattr(a, name) < 1:
      p.error(f'--{name}={getattr(a, name)} must be at least 1')
  if a.top_k > a.experts or min(a.shared, a.block_size) < 0 or any(d < 1 for d in a.depths):
    p.error('need 1 <= --top_k <= --experts, --shared >= 0, --block_size >= 0 and --depths >= 1')
  if a.d_model % a.heads or (a.d_model // a.heads) % 2 or a.heads % 2:
    p.error(f'--d_model={a.d_model} / --heads={a.heads} must give an even head width, with '
            'an even number of heads')
  from moejax.bench.train import bench_train
  for row in bench_train(a):
    print(json.dumps(row), flush=True)
  return 0


def _data(p, a):
  if a.batches < 1 or a.reps < 1:
    p.error('--batches and --reps must be at least 1')
  from moejax.bench.data import bench_data
  config = cli.load_config(a.config)
  for row in bench_data(config, a.prepared_dir, a.batches, a.reps):
    print(json.dumps(row), flush=True)
  return 0


def main(argv=None):
  return cli.run(_main, argv)


if __name__ == '__main__':
  sys.exit(main())
