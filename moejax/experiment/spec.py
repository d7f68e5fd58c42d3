"""What an experiment is: its arms, the rungs of a compute ladder, post-evaluations, the
downstream tasks each run is evaluated on, and the key of one run (runner.py runs them)."""
from __future__ import annotations

import dataclasses
import os
from typing import Any


@dataclasses.dataclass
class Arm:
  """One setting under comparison: dotted config overrides, e.g. {'model.moe.num_experts': 16}.
  `upcycle_from` names an arm whose checkpoint at `upcycle_at` x train.steps (same seed) this
  arm starts from, converted to MoE by moejax.upcycle (that arm must checkpoint there)."""
  overrides: dict
  upcycle_from: str = ''
  upcycle_at: float = 0.5
  upcycle_mode: str = 'copy'


@dataclasses.dataclass
class Rung:
  """One scale of a compute ladder: overrides of the base (width, depth, experts' width, steps,
  batch) that every arm shares, and the seeds run at it (default: the experiment's)."""
  overrides: dict
  seeds: tuple | None = None


@dataclasses.dataclass
class PostEval:
  """Evaluate finished runs again under eval-time overrides, e.g. expert choice evaluated
  non-causally; `arms`: the arms it applies to (default: every arm)."""
  overrides: dict
  arms: tuple | None = None


@dataclasses.dataclass
class Tasks:
  """lm-eval tasks every finished run's final checkpoint is evaluated on (moejax.evaluate): the
  report's columns '<task> <metric>' for each metric the task reports, and a comparison of
  `metric` with the baseline by the statistics of the loss (higher is better; `delta` its
  equivalence margin, in the metric's units). Task files are found in `include_path` and in
  the shipped experiments/tasks."""
  names: tuple  # lm-eval task names
  include_path: tuple = ()  # more folders of task YAML files
  metric: str = 'acc'  # the compared metric (lm-eval's name, e.g. 'acc_norm')
  delta: float = 0.02
  num_fewshot: int | None = None  # None: each task's own
  limit: int | None = None  # the first documents of each task (None: all of them)
  smoke_limit: int = 8  # ... in a --smoke run
  batch_size: int = 64  # rows per forward pass

  def __post_init__(self):
    self.names = (self.names,) if isinstance(self.names, str) else tuple(self.names)
    self.include_path = ((self.include_path,) if isinstance(self.include_path, str)
                         else tuple(self.include_path))


@dataclasses.dataclass
class Experiment:
  name: str
  base: Any  # ml_collections.ConfigDict shared by every arm
  arms: dict  # arm name -> Arm or a dict of overrides
  seeds: tuple = (0, 1, 2)
  # Extra columns: name -> fn(metric rows of one run, its config) -> number or list per layer.
  columns: dict = dataclasses.field(default_factory=dict)
  # name -> PostEval (or a dict of overrides for every arm); the column '<name>/loss'.
  post_evals: dict = dataclasses.field(default_factory=dict)
  smoke: dict = dataclasses.field(default_factory=dict)  # overrides for --smoke
  note: str = ''  # what the literature found (markdown)
  # The arm every other arm is compared with (paired by seed where they can pair): report.py.
  baseline: str = ''
  # The equivalence margin of the primary metric (val_loss, nats per token): within it two
  # arms are called equivalent when the two one-sided tests say so.
  delta: float = 0.01
  rungs: dict = dataclasses.field(default_factory=dict)  # rung name -> Rung (a compute ladder)
  tasks: Tasks | None = None  # downstream tasks each run's final checkpoint is evaluated on

  def arm(self, name: str) -> Arm:
    a = self.arms[name]
    return a if isinstance(a, Arm) else Arm(dict(a))

  def post_eval(self, name: str) -> PostEval:
    p = self.post_evals[name]
    return p if isinstance(p, PostEval) else PostEval(dict(p))

  def rung(self, name: str) -> Rung:
    r = self.rungs[name]
    return r if isinstance(r, Rung) else Rung(dict(r))

  def rung_seeds(self, rung: str | None) -> tuple:
    return tuple((self.rung(rung).seeds if rung else None) or self.seeds)


@dataclasses.dataclass(frozen=True)
class RunKey:
  """One run of an experiment: (rung or None, arm, seed)."""
  rung: str | None
  arm: str
  seed: int

  def dir(self, workdir: str) -> str:
    parts = ([self.rung] if self.rung else []) + [self.arm, f'seed_{self.seed}']
    return os.path.join(workdir, *parts)
