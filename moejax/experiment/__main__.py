"""python -m moejax.experiment (moejax/experiment/command.py)."""
import sys

from moejax.experiment.command import main

if __name__ == '__main__':
  sys.exit(main())
