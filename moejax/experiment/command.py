"""The command: python -m moejax.experiment EXPERIMENT[:ARG] --workdir=DIR [--smoke] [--arms=A,B]
[--rungs=R,S] [--seeds=N | --seeds=S,T] [--until_decided --budget=3h [--max_seeds=12]
[--round=2]] [--config.x=v]; --list shows the shipped experiments, or one experiment's arms,
rungs and seeds."""
from __future__ import annotations

import os
import sys

from moejax import cli
from moejax.errors import ConfigError
from moejax.experiment.runner import (SHARED_FILES, experiment_path, load_experiment,
                                      override_base, run)
from moejax.experiment.sequential import Until, parse_budget


def parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(
      prog='python -m moejax.experiment',
      description='Run an experiment: arms x seeds (x the rungs of a compute ladder), each a '
      'resumable training run, then DIR/results.md with paired statistics and the plots.',
      epilog='--config.SECTION.FIELD=VALUE overrides a field of the base config every arm '
      'shares (not one an arm or a rung varies); fields and defaults: moejax/config.py.')
  p.add_argument('experiment', nargs='?', default='',
                 help="experiments/NAME.py or a shipped experiment's name (see --list), with "
                 "':ARG' for a preset it offers (e.g. token_vs_expert_choice:tpu)")
  p.add_argument('--workdir', help='the folder of the runs and the report (required to run); '
                 'an existing one is resumed: finished runs are kept')
  p.add_argument('--smoke', action='store_true',
                 help='a few steps per run on a small slice of the corpus, compiled at XLA\'s '
                 'lowest optimisation level (for tests): not a result')
  p.add_argument('--arms', default='', help='comma-separated subset of arms (default: all)')
  p.add_argument('--rungs', default='', help='comma-separated subset of the ladder\'s rungs '
                 '(default: all)')
  p.add_argument('--seeds', default='', help='N: the first N seeds; S,T,..: these seeds '
                 '(default: the experiment\'s)')
  p.add_argument('--until_decided', action='store_true',
                 help='after the planned seeds, add seeds in rounds to the comparisons still '
                 'inconclusive, cheapest to decide first, until each is decided, reaches '
                 '--max_seeds, or --budget is spent (every test corrected for the looks: '
                 'moejax/experiment/sequential.py); the same command resumes')
  p.add_argument('--budget', default='', help='with --until_decided: the time this invocation '
                 'may train, e.g. 3h, 90m, 1h30m (required)')
  p.add_argument('--max_seeds', type=int, default=12, help='with --until_decided: the most seeds '
                 'a comparison may reach (default 12); fixed once a workdir has looked')
  p.add_argument('--round', type=int, default=2, help='with --until_decided: the seeds a round '
                 'adds to each undecided comparison (default 2); fixed once a workdir has looked')
  p.add_argument('--list', action='store_true', help='list the shipped experiments, or with '
                 'EXPERIMENT its arms, rungs and seeds, and exit')
  p.add_argument('--print_config', action='store_true',
                 help='print the base config (after overrides) and exit')
  return p


def parse_seeds(text: str, all_seeds) -> list | None:
  """'' -> None (all); 'N' -> the first N seeds; 'S,T' -> those seeds."""
  if not text:
    return None
  try:
    values = [int(v) for v in text.split(',') if v.strip()]
  except ValueError:
    raise ConfigError(f'--seeds={text}: give N (the first N seeds) or seeds S,T,...') from None
  if len(values) == 1 and ',' not in text:
    if values[0] < 1:
      raise ConfigError(f'--seeds={text}: N must be at least 1')
    return list(all_seeds)[:values[0]]
  if any(v < 0 for v in values):
    raise ConfigError(f'--seeds={text}: seeds are >= 0')
  return values


# A smoke run's programs run a few steps: compile them at XLA's cheapest optimisation level
# (about a third less time to compile here; flags the user sets come after and win).
SMOKE_XLA_FLAGS = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'


def describe(exp) -> str:
  lines = [f'{exp.name}: seeds {list(exp.seeds)}' + (f', baseline {exp.baseline!r}, margin '
                                                     f'{exp.delta:g}' if exp.baseline else '')]
  lines += [f'  arm {name}: {exp.arm(name).overrides}' for name in exp.arms]
  lines += [f'  rung {name}: {exp.rung(name).overrides} seeds {list(exp.rung_seeds(name))}'
            for name in exp.rungs]
  return '\n'.join(lines)


def until_of(args, exp) -> Until | None:
  """The --until_decided request, its flags checked (before anything compiles)."""
  given = [f for f, default in (('budget', ''), ('max_seeds', 12), ('round', 2))
           if getattr(args, f) != default]
  if not args.until_decided:
    if given:
      raise ConfigError(f'--{given[0]} applies to --until_decided only: add --until_decided, or '
                        f'drop --{given[0]}')
    return None
  if not exp.baseline:
    raise ConfigError(f'--until_decided: experiment {exp.name!r} compares no arms with a '
                      'baseline, so there is no verdict to wait for; drop --until_decided')
  if not args.budget:
    raise ConfigError('--until_decided needs --budget (how long this invocation may train, '
                      'e.g. --budget=3h); the same command resumes later')
  if args.round < 1:
    raise ConfigError(f'--round={args.round}: a round adds at least 1 seed')
  return Until(parse_budget(args.budget), args.max_seeds, args.round)


def _main(argv=None) -> int:
  p = parser()
  rest, overrides = cli.split_overrides(sys.argv[1:] if argv is None else list(argv))
  args = p.parse_args(rest)
  if args.smoke:  # before jax starts its backend (which reads XLA_FLAGS once)
    os.environ['XLA_FLAGS'] = f"{SMOKE_XLA_FLAGS} {os.environ.get('XLA_FLAGS', '')}".strip()
  if args.list and not args.experiment:
    for name in cli.shipped_names('moejax.experiments', SHARED_FILES):
      exp = load_experiment(name)
      print(f"{name}: {exp.name} (arms: {', '.join(exp.arms)}"
            + (f"; rungs: {', '.join(exp.rungs)}" if exp.rungs else '') + ')')
    return 0
  if not args.experiment:
    raise ConfigError('give an experiment (a file or a shipped name; --list shows them)')
  experiment_path(args.experiment.partition(':')[0])  # a bad name is said before anything
  exp = override_base(load_experiment(args.experiment), overrides)
  if args.list:
    print(describe(exp))
    return 0
  if args.print_config:
    print(exp.base)
    return 0
  if not args.workdir:
    raise ConfigError('--workdir is required: the folder of the runs and the report')
  seeds = parse_seeds(args.seeds, exp.seeds)
  arms = [a for a in args.arms.split(',') if a] or None
  rungs = [r for r in args.rungs.split(',') if r] or None
  run(exp, args.workdir, args.smoke, arms, seeds, rungs=rungs, until=until_of(args, exp))
  path = os.path.join(args.workdir, 'results.md')
  print(f'report: {path} (plots next to it; each run in {args.workdir}/[RUNG/]ARM/seed_S, '
        f'TensorBoard: tensorboard --logdir {args.workdir})')
  return 0


def main(argv=None) -> int:
  return cli.run(_main, argv)


if __name__ == '__main__':
  sys.exit(main())
