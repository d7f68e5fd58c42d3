"""python -m moejax.bench (moejax/bench/command.py)."""
import sys

from moejax.bench.command import main

if __name__ == '__main__':
  sys.exit(main())
