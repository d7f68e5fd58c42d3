"""The divergence guard's policy: what the loop does with a step whose update the train step
refused because its loss, gradients or new parameters were not finite (config.train.nonfinite).

'stop' (the default: a diverged run is a result to see, not to paper over) ends the run, naming
the step; 'skip' drops that batch's update and goes on, up to train.max_nonfinite bad steps in a
row; 'rollback' restores the newest checkpoint and skips every batch from it up to the bad one
(PaLM's remedy for loss spikes), up to train.max_nonfinite rollbacks without a new checkpoint.
"""
from __future__ import annotations

import sys

import jax

from moejax.errors import Diverged

NONFINITE = ('stop', 'skip', 'rollback')


class Guard:
  """Reads each step's `train/finite` flag and decides: go on, roll back, or stop."""

  def __init__(self, t):
    self.mode, self.limit = t.nonfinite, t.max_nonfinite
    self.in_a_row = self.rollbacks = self.skipped = 0
    self.last_saved = None

  def ok(self, step: int, metrics) -> bool:
    """True: go on. False: roll back to the newest checkpoint. Raises Diverged when the run
    must stop."""
    if bool(jax.device_get(metrics['train/finite'])):
      self.in_a_row = 0
      return True
    loss, norm = (float(jax.device_get(metrics[k])) for k in ('train/loss', 'train/grad_norm'))
    where = (f'step {step}: the loss ({loss}) or gradient norm ({norm}) is not finite; the '
             'update was not applied')
    saved = ('no checkpoint was written' if self.last_saved is None else
             f'the newest checkpoint is step {self.last_saved}')
    fix = 'lower train.lr or raise train.warmup_steps'
    if self.mode == 'stop':
      raise Diverged(f'{where} and the run stopped ({saved}, nothing non-finite was written). '
                     f'To go on: {fix}, or set train.nonfinite=skip or rollback')
    self.in_a_row += 1
    if self.mode == 'skip':
      self.skipped += 1
      if self.in_a_row > self.limit:
        raise Diverged(f'{where}; {self.in_a_row} steps in a row were not finite (more than '
                       f'train.max_nonfinite={self.limit}), so the run stopped ({saved}). {fix}')
      print(f'warning: {where}: batch skipped (train.nonfinite=skip)', file=sys.stderr)
      return True
    self.rollbacks += 1
    if self.rollbacks > self.limit:
      raise Diverged(f'{where}; {self.rollbacks - 1} rollbacks did not reach a new checkpoint '
                     f'(train.max_nonfinite={self.limit}), so the run stopped ({saved}). {fix}')
    return False

  def saved(self, step: int):
    """A checkpoint of `step` was written: rollbacks count from here."""
    self.last_saved, self.rollbacks = step, 0
