"""Train a model: python -m moejax.main --config=configs/quickstart.py --workdir=DIR [--config.x=v]

Resumes automatically from the latest intact checkpoint in DIR/checkpoints; a finished run says
so and exits. Without --config, DIR/config.py is the config when there is one (a workdir made by
python -m moejax.hf import). Exit codes: 0 done, 2 a user error (one line naming the field or file), 3 the run
diverged (a non-finite loss or gradient; see config.train.nonfinite), 4 the run was preempted
(SIGTERM, or JAX's preemption notice on several hosts): it finished the step in flight, saved a
checkpoint there and says so; the same command resumes it.

Several hosts (JAX's multi-controller runtime: every host runs this same command):
  --distributed                     jax.distributed.initialize() finds its peers itself (TPU
                                    pod slices, SLURM / Open MPI GPU clusters);
  --coordinator=HOST:PORT --num_processes=N --process_id=I
                                    explicit peers (any cluster; localhost for a CPU test, whose
                                    collectives then go through gloo).
"""
from __future__ import annotations

import argparse
import sys

from moejax import cli
from moejax.errors import ConfigError


def parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog='python -m moejax.main', description=__doc__.split('\n')[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_config_args(p)
  p.add_argument('--workdir', help='directory for checkpoints, metrics and plots (required)')
  p.add_argument('--replay', default=None, metavar='FILE',
                 help='train on a routing trace (python -m moejax.routes --trace=FILE, or an '
                 "inference engine's routed experts [batch, seq, moe_layers, top_k] with the "
                 'token ids), every MoE layer routed as recorded; sets config.data.replay')
  cli.add_distributed_args(p)
  return p


def _main(argv=None) -> int:
  import os
  argv = sys.argv[1:] if argv is None else list(argv)
  args, _ = parser().parse_known_args([a for a in argv if not a.startswith('--config.')])
  own = args.workdir and os.path.exists(os.path.join(args.workdir, 'config.py'))
  if not args.config and own:
    # A workdir that carries its config (python -m moejax.hf import writes one) needs no flag.
    argv.append(f'--config={os.path.join(args.workdir, "config.py")}')
  args, config = cli.parse(parser(), argv)
  if not args.workdir:
    raise ConfigError('--workdir is required: the directory for checkpoints, metrics and plots')
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint step at INFO.
  from moejax.training.loop import outputs_line, summary_line, train
  if args.replay:
    config.data.replay = os.path.abspath(args.replay)
  cli.init_distributed(args)
  last = train(config, args.workdir)
  print(summary_line(last, config))
  print(outputs_line(args.workdir))
  return 0


def main(argv=None) -> int:
  return cli.run(_main, argv)


if __name__ == '__main__':
  sys.exit(main())
