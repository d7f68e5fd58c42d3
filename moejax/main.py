"""Train a model: python -m moejax.main --config=configs/quickstart.py --workdir=DIR [--config.x=v]

Resumes automatically from the latest checkpoint in DIR/checkpoints.

Several hosts (JAX's multi-controller runtime: every host runs this same command):
  --distributed                     jax.distributed.initialize() finds its peers itself (TPU
                                    pod slices, SLURM / Open MPI GPU clusters);
  --coordinator=HOST:PORT --num_processes=N --process_id=I
                                    explicit peers (any cluster; localhost for a CPU test, whose
                                    collectives then go through gloo).
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from moejax.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file (get_config()).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and plots.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'Join the other hosts with '
                                 'jax.distributed.initialize() auto-detection.')
_COORDINATOR = flags.DEFINE_string('coordinator', '', 'HOST:PORT of process 0 (explicit setup).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Processes in the run (explicit setup).')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'This process (0..N-1, explicit setup).')
flags.mark_flags_as_required(['config', 'workdir'])


def init_distributed():
  """Join the multi-controller run before any JAX computation, if asked to."""
  if not (_DISTRIBUTED.value or _COORDINATOR.value):
    return
  import jax
  # CPU hosts reduce across processes through gloo; GPU/TPU use their own collectives.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if _COORDINATOR.value:
    if _NUM_PROCESSES.value < 1 or not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
      raise ConfigError(f'--coordinator={_COORDINATOR.value} needs --num_processes >= 1 and '
                        f'0 <= --process_id < --num_processes (got {_NUM_PROCESSES.value}, '
                        f'{_PROCESS_ID.value})')
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  else:
    jax.distributed.initialize()


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint step at INFO.
  from moejax.training.loop import train
  try:
    init_distributed()
    last = train(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  summary = {k: v if k == 'step' else round(float(v), 4) for k, v in last.items()
             if k == 'step' or getattr(v, 'ndim', 0) == 0 and not isinstance(v, list)}
  print('final:', summary)


if __name__ == '__main__':
  app.run(main)
