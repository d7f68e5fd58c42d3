"""Train a model: python -m moejax.main --config=configs/quickstart.py --workdir=DIR [--config.x=v]

Resumes automatically from the latest checkpoint in DIR/checkpoints.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from moejax.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file (get_config()).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and plots.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint step at INFO.
  from moejax.training.loop import train
  try:
    last = train(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  summary = {k: v if k == 'step' else round(float(v), 4) for k, v in last.items()
             if k == 'step' or getattr(v, 'ndim', 0) == 0 and not isinstance(v, list)}
  print('final:', summary)


if __name__ == '__main__':
  app.run(main)
