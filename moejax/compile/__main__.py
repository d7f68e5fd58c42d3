"""Compile a config for a TPU pod from this CPU machine, and read what the pod would run.

python -m moejax.compile --config=mixtral_8x7b --topology=v5p-32 --config.mesh.expert=8 ...

XLA's TPU compiler (libtpu: pip install "moejax[tpu]") compiles the train step (and with
--programs the eval and decode steps) for compile-only devices of a real TPU topology, so
running out of memory is the error the pod would give. Per chip it reports: fits or not and by
how much; memory by kind beside the planner's estimate; the collectives by kind, bytes and mesh
axes; model FLOPs, an expected step time and MFU from a stated roofline (moejax/compile/
report.py); compile time. Markdown on stdout (--json: one JSON object); --out=DIR writes
compile.json and compile.md; --dump_hlo=DIR the optimized HLO of each program. --search tries
mesh shapes, remat, dispatch and batch and ranks the candidates that fit (compile/search.py).
--experiment=NAME[:ARG] compiles every cell of an experiment and says how long all its runs
would take (compile/experiment.py).
"""
from __future__ import annotations

import json
import os
import sys

from moejax import cli
from moejax.errors import ConfigError


def parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog='python -m moejax.compile', description=__doc__.split('\n')[0],
                         epilog=None)
  cli.add_config_args(p)
  p.add_argument('--experiment', default='', metavar='NAME[:ARG]', help='instead of --config: '
                 'compile every (rung, arm) cell of this experiment (e.g. '
                 'token_vs_expert_choice:tpu) and report the expected time of all its runs; '
                 '--config.* overrides apply to every run')
  p.add_argument('--topology', required=True, help='the TPU slice as Cloud TPU names it: v4-N '
                 'and v5p-N count TensorCores (v5p-128 is 64 chips), v5e-N and v6e-N count chips')
  p.add_argument('--slices', type=int, default=1, help='slices joined over the data-center '
                 'network (multi-slice); the data axis spans them, or the axes that '
                 'config.mesh.dcn_data / dcn_fsdp name')
  p.add_argument('--programs', default='train', help='comma-separated: train, eval, decode')
  p.add_argument('--decode_batch', type=int, default=0,
                 help='sequences decoded at once for the decode step (0: train.batch_size)')
  p.add_argument('--cache_len', type=int, default=0,
                 help='KV-cache positions for the decode step (0: data.seq_len)')
  p.add_argument('--json', action='store_true', help='print one JSON object instead of Markdown')
  p.add_argument('--out', default='', help='write compile.json and compile.md (or search.json '
                 'and search.md) into this folder')
  p.add_argument('--dump_hlo', default='', help="write each program's optimized HLO text here")
  p.add_argument('--search', action='store_true', help='try mesh shapes, remat policies, '
                 'dispatch paths and per-chip batches; rank those that fit by expected time '
                 'per token')
  p.add_argument('--max_candidates', type=int, default=12,
                 help='--search: compile at most this many candidates (the planner orders them)')
  p.add_argument('--batches', default='',
                 help='--search: global batch sizes to try, comma-separated (default: the '
                 "config's train.batch_size)")
  p.add_argument('--dispatches', default='auto,all_to_all',
                 help='--search: dispatch paths to try, comma-separated')
  p.add_argument('--remats', default='none,full', help='--search: model.remat values to try')
  return p


def _programs(text: str) -> tuple:
  from moejax.compile.program import PROGRAMS
  names = tuple(x.strip() for x in text.split(',') if x.strip())
  bad = [n for n in names if n not in PROGRAMS]
  if bad or not names:
    raise ConfigError(f'--programs={text!r}: comma-separated names from {list(PROGRAMS)}')
  return names


def _write(folder: str, name: str, report: dict, text: str):
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    raise ConfigError(f'--out={folder}: cannot create it ({e.strerror})') from None
  with open(os.path.join(folder, f'{name}.json'), 'w') as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(folder, f'{name}.md'), 'w') as f:
    f.write(text + '\n')


def _main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  rest, overrides = cli.split_overrides(argv)
  if parser().parse_known_args(rest)[0].experiment:  # overrides apply to every run
    args, config = parser().parse_args(rest), None
    if args.config or args.search:
      raise ConfigError('--experiment compiles the experiment\'s own runs: drop --config and '
                        '--search')
  else:
    args, config = cli.parse(parser(), argv)
  from moejax.compile import chips
  topology = chips.parse_topology(args.topology, args.slices)
  programs = _programs(args.programs)
  for flag in ('decode_batch', 'cache_len', 'max_candidates'):
    if getattr(args, flag) < 0:
      raise ConfigError(f'--{flag}={getattr(args, flag)}: must be >= 0')
  if not chips.libtpu_installed():
    raise ConfigError(chips.INSTALL)
  import jax
  jax.config.update('jax_platforms', 'cpu')  # the host compiles; the TPU is the target
  name = args.config
  if args.experiment:
    from moejax.compile import experiment
    experiment.check_spec(args.experiment)
    report = experiment.run(args.experiment, topology, overrides)
    text = experiment.markdown(report)
    stem = 'experiment'
  elif args.search:
    from moejax.compile import search
    report = search.run(config, topology, name, args)
    text = search.markdown(report)
    stem = 'search'
  else:
    from moejax.compile import program, report as reports
    target, compiled = program.compile_config(config, topology, programs, args.decode_batch,
                                              args.cache_len, keep_hlo=bool(args.dump_hlo))
    hbm = chips.usable_hbm(topology)
    report = {'header': reports.header(config, target, name),
              'programs': [reports.program_report(config, target, c, hbm, args.decode_batch)
                           for c in compiled]}
    text = reports.markdown(report)
    stem = 'compile'
    if args.dump_hlo:
      os.makedirs(args.dump_hlo, exist_ok=True)
      for c in compiled:
        with open(os.path.join(args.dump_hlo, f'{c.program}.hlo.txt'), 'w') as f:
          f.write(c.hlo_text)
  if args.out:
    _write(args.out, stem, report, text)
  print(json.dumps(report) if args.json else text)
  return 0


def main(argv=None) -> int:
  return cli.run(_main, argv)


if __name__ == '__main__':
  sys.exit(main())
