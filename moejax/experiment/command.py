"""The command: python -m moejax.experiment EXPERIMENT --workdir=DIR [--smoke] [--arms=A,B]
[--seeds=N] [--config.x=v]."""
from __future__ import annotations

import os
import sys

from moejax import cli
from moejax.errors import ConfigError
from moejax.experiment.runner import load_experiment, override_base, run


def _main(argv=None) -> int:
  p = cli.ArgumentParser(prog='python -m moejax.experiment',
                         description='Run an experiment file: arms x seeds, then a report.',
                         epilog='--config.SECTION.FIELD=VALUE overrides a field of the base '
                         'config every arm shares (not one an arm varies); fields and defaults: '
                         'moejax/config.py (base_config).')
  p.add_argument('experiment', help='experiments/NAME.py, or a shipped experiment\'s name')
  p.add_argument('--workdir', required=True)
  p.add_argument('--smoke', action='store_true', help='seconds-long version (for tests)')
  p.add_argument('--arms', default='', help='comma-separated subset of arms')
  p.add_argument('--seeds', type=int, default=0, help='use only the first N seeds')
  p.add_argument('--print_config', action='store_true',
                 help="print the base config (after overrides) and exit")
  rest, overrides = cli.split_overrides(sys.argv[1:] if argv is None else list(argv))
  args = p.parse_args(rest)
  if args.seeds < 0:
    raise ConfigError(f'--seeds={args.seeds}: must be >= 0 (0: all seeds)')
  exp = override_base(load_experiment(args.experiment), overrides)
  if args.print_config:
    print(exp.base)
    return 0
  seeds = list(exp.seeds)[:args.seeds] if args.seeds else None
  arms = [a for a in args.arms.split(',') if a] or None
  run(exp, args.workdir, args.smoke, arms, seeds)
  print(os.path.join(args.workdir, 'results.md'))
  return 0


def main(argv=None) -> int:
  return cli.run(_main, argv)


if __name__ == '__main__':
  sys.exit(main())
