"""Opening a run, spelled once: validate the config (before anything compiles), lay out the
mesh, build the Trainer; and reading a workdir's checkpoints back. Every command that opens a
run goes through here: training, sampling, post-evaluation, upcycling, Hugging Face import and
export, the benchmarks.
"""
from __future__ import annotations

import copy
import dataclasses
import os

import jax

from moejax import checks
from moejax.config import from_dict, set_fields
from moejax.errors import ConfigError
from moejax.parallel.mesh import make_mesh
from moejax.training.checkpoint import Checkpointer, CorruptCheckpoint
from moejax.training.step import Trainer


@dataclasses.dataclass
class Run:
  """A config on a mesh, with its compiled steps (Trainer)."""
  config: object
  mesh: jax.sharding.Mesh
  trainer: Trainer


def open_run(config, devices=None) -> Run:
  """Validate config for `devices` (default: all), then build its mesh and Trainer.

  Raises ConfigError (one line naming the field) before anything is traced or compiled."""
  devices = jax.devices() if devices is None else list(devices)
  mesh = make_mesh(checks.validate(config, len(devices)), devices, config.mesh)
  return Run(config, mesh, Trainer(config, mesh))


def on_any_mesh(config):
  """A copy of config whose mesh takes whatever devices this machine has (data=-1): for
  reading a checkpoint, which restores onto any mesh."""
  config = copy.deepcopy(config)
  config.mesh.data, config.mesh.fsdp, config.mesh.expert, config.mesh.tensor = -1, 1, 1, 1
  config.mesh.dcn_data, config.mesh.dcn_fsdp = 1, 1
  return config


def nearby_runs(workdir: str, limit: int = 5, scanned: int = 2000) -> list[str]:
  """Workdirs with checkpoints under the nearest existing folder above `workdir` (a mistyped
  run of an experiment: its siblings), the closest spellings first."""
  import difflib
  path = os.path.abspath(workdir)
  root = os.path.dirname(path)
  while root and not os.path.isdir(root):
    root = os.path.dirname(root)
  runs = []
  for n, (dirpath, dirnames, _) in enumerate(os.walk(root)):
    if n >= scanned:
      break
    if dirpath.count(os.sep) - root.count(os.sep) >= 4:
      dirnames[:] = []
    if 'checkpoints' in dirnames:
      runs.append(dirpath)
      dirnames[:] = []
    else:
      dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
  close = difflib.get_close_matches(path, runs, n=limit, cutoff=0.6)
  return [os.path.relpath(r) if not os.path.isabs(workdir) else r for r in close]


def checkpoints(workdir: str, what: str = '--workdir') -> tuple[Checkpointer, list[int]]:
  """(a read-only Checkpointer, its steps) of a workdir that has checkpoints; else ConfigError
  saying so, naming the flag `what`."""
  if not os.path.isdir(workdir):
    near = nearby_runs(workdir)
    raise ConfigError(f'{what}={workdir}: no such folder' + (
        f'; runs with checkpoints nearby: {", ".join(near)}' if near else
        '; give the workdir of a training run'))
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise ConfigError(f'{what}={workdir}: no checkpoint (no {workdir}/checkpoints); train '
                      'first with python -m moejax.main')
  ckpt = Checkpointer(workdir, keep=1_000_000)
  steps = ckpt.all_steps()
  if not steps:
    ckpt.close()
    raise ConfigError(f'{what}={workdir}: no checkpoint in {ckpt.directory}')
  return ckpt, steps


def saved_config(ckpt: Checkpointer, steps: list[int], step: int | None = None,
                 what: str = '--step'):
  """The config a checkpoint was written with (the newest, or `step`), on today's schema."""
  if step is not None and step not in steps:
    raise ConfigError(f'{what}={step}: {ckpt.workdir} has checkpoints at steps {steps}')
  return from_dict(ckpt.read_config(step if step is not None else steps[-1]))


def restore(run: Run, ckpt: Checkpointer, step: int | None = None, *, check_config=False,
            move=False, what: str = '--step'):
  """(step, state, data state) of the newest intact checkpoint (None if there is none), or of
  `step` (a corrupt one is a ConfigError). check_config: refuse a checkpoint of another model;
  move: set corrupt newer checkpoints aside (a training run), else only report them."""
  if step is None:
    return ckpt.restore_intact(run.trainer.abstract_state,
                               run.config.to_dict() if check_config else None, move=move)
  try:
    state, data = ckpt.restore(step, run.trainer.abstract_state)
  except CorruptCheckpoint as e:
    raise ConfigError(f'{what}={step}: that checkpoint is corrupt: {e}') from None
  return step, state, data


def load(workdir: str, step: int | None = None, config=None, overrides: dict | None = None):
  """A finished or running workdir, read-only: (run, step, state).

  Args:
    workdir: a training run's directory.
    step: a checkpoint step (default: the newest intact one).
    config: the config to evaluate it under (default: the one the checkpoint was written with).
    overrides: dotted fields set on that config (e.g. an evaluation-time routing setting).
  """
  ckpt, steps = checkpoints(workdir)
  try:
    if config is None:
      config = saved_config(ckpt, steps, step)
    config = on_any_mesh(config)
    if overrides:
      set_fields(config, overrides)
    run = open_run(config)
    restored = restore(run, ckpt, step)
  finally:
    ckpt.close()
  if restored is None:
    raise ConfigError(f'--workdir={workdir}: no intact checkpoint')
  step, state, _ = restored
  return run, step, state
