"""Benchmarks (python -m moejax.bench moe|train|data): speed and memory, printed as JSON rows,
ratios taken within one run."""
from moejax.bench.command import main

__all__ = ['main']
