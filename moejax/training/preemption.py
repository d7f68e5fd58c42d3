"""Preemption: the notice a scheduler sends before it takes the machines back (SIGTERM from TPU
spot VMs and queued resources, SLURM and Kubernetes, then a grace period before SIGKILL), turned
into a checkpoint at one step every process agrees on.

Several processes (jax.distributed): JAX's preemption service catches the notice on whichever
host gets it, and `multihost_utils.reached_preemption_sync_point(step)` turns true on every host
at the same step (the largest step any host had reached, plus one), as Orbax's
`CheckpointManager.reached_preemption` uses it; every host must ask at every step, which the
training loop does. One process: a SIGTERM handler sets a flag the loop reads after each step.
Either way the loop finishes the step in flight, logs it, saves a checkpoint there and stops;
`train` then raises Preempted, and the command exits with code 4 and one line.
"""
from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preemption:
  """Whether the run has been asked to stop, read once per step (reached(step))."""

  def __init__(self):
    self.requested = False
    self._previous = None
    self._shared = jax.process_count() > 1  # JAX's preemption service owns SIGTERM then
    if not self._shared and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._notice)

  def _notice(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    """True at the step to stop after: on every process at the same step."""
    if self._shared:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self):
    """Give SIGTERM back to whoever had it before the run."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
