"""Orbax checkpoints of the train state, the data iterator's state and the config.

A checkpoint restores onto any mesh (the target's shardings decide the layout). Before touching
the arrays, the saved model config is compared with the run's, so a workdir that belongs to a
different model gets a clear error instead of an Orbax shape failure.
"""
from __future__ import annotations

import os

import orbax.checkpoint as ocp

from moejax.config import ConfigError, from_dict

# Fields that change the arrays in the state; anything else (steps, lr, mesh, data) may differ.
_STATE_SECTIONS = ('model',)


class Checkpointer:
  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=('state', 'data', 'config'),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, config_dict: dict):
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_dict)))

  def read_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))['config']

  def check_compatible(self, step: int, config_dict: dict):
    saved = from_dict(self.read_config(step)).to_dict()
    diffs = []
    for section in _STATE_SECTIONS:
      diffs += _diff(saved.get(section, {}), config_dict[section], section)
    if diffs:
      raise ConfigError(
          f'the workdir {os.path.dirname(self.directory)} holds a checkpoint (step {step}) of a '
          f'different model: ' + '; '.join(diffs) + '. Use a new --workdir, or run with the '
          'config that wrote it.')

  def restore(self, step: int, abstract_state):
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out['state'], out['data']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def _diff(saved, current, prefix: str) -> list[str]:
  out = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key, '<absent>'), current.get(key, '<absent>')
    name = f'{prefix}.{key}'
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, name)
    elif a != b:
      out.append(f'config.{name} was {a!r}, now {b!r}')
  return out
