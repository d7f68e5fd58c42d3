"""Orbax checkpoints of the train state, the data iterator's state and the config, with an
integrity record.

A checkpoint restores onto any mesh (the target's shardings decide the layout). Before touching
the arrays, the saved model config is compared with the run's, so a workdir that belongs to a
different model gets a clear error instead of an Orbax shape failure.

Integrity: every save also writes `integrity`, a 32-bit fingerprint of each array (a mixed hash
of every element's bits and position, summed modulo 2**32 on device, so it does not depend on
the mesh) and refuses a state that is not finite. A restore recomputes the fingerprints: a
flipped bit, a truncated or missing file, or a non-finite array makes that checkpoint corrupt.
The run then warns, moves it to `checkpoints_corrupt/STEP` (kept for inspection, never
deleted) and falls back to the newest intact one; with none intact it refuses in one line.
Falling back is the default because the corrupt step is never silently used, the warning names
it, and a preemptible run must continue unattended; retention keeps `train.keep_checkpoints`.
"""
from __future__ import annotations

import os
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from moejax.config import from_dict
from moejax.errors import ConfigError

# Fields that change the arrays in the state; anything else (steps, lr, mesh, data) may differ.
_STATE_SECTIONS = ('model',)
_ITEMS = ('state', 'data', 'config', 'integrity')


def _as_u32(x):
  """The bits of x as uint32 values (wider types give several per element)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  width = x.dtype.itemsize
  if width == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if width < 4:
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[width]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., width // 4]


def _fingerprint(x) -> jax.Array:
  """sum over elements of mix(bits ^ position), modulo 2**32: order-free, so any mesh agrees."""
  u = _as_u32(x)
  pos = jnp.zeros(u.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(u.ndim)):
    pos = pos + jax.lax.broadcasted_iota(jnp.uint32, u.shape, d) * jnp.uint32(stride % 2**32)
    stride *= u.shape[d]
  h = u ^ (pos * jnp.uint32(0x9E3779B9))
  h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)  # murmur3's finaliser
  h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
  h = h ^ (h >> 16)
  return jnp.sum(h, dtype=jnp.uint32)


@jax.jit
def _integrity(state):
  leaves = jax.tree.leaves(state)
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves
                              if jnp.issubdtype(x.dtype, jnp.inexact)] or [jnp.array(True)]))
  return [_fingerprint(x) for x in leaves], finite


def integrity(state) -> tuple[dict, bool]:
  """({array path: fingerprint}, every float array finite)."""
  prints, finite = jax.device_get(_integrity(state))
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
  return {p: int(f) for p, f in zip(paths, prints)}, bool(finite)


class CorruptCheckpoint(Exception):
  pass


def _quiet_closed_loop_hook():
  """A failed Orbax restore leaves tensorstore callbacks that fire into its closed asyncio
  loop; Python prints each as an 'unraisable' traceback (hundreds of lines, after the cause
  was already reported). Drop exactly those; every other unraisable goes to the usual hook."""
  previous = sys.unraisablehook
  if getattr(previous, 'moejax_filter', False):
    return

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed':
      return
    previous(unraisable)
  hook.moejax_filter = True
  sys.unraisablehook = hook


class Checkpointer:
  def __init__(self, workdir: str, keep: int):
    _quiet_closed_loop_hook()
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, 'checkpoints')
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=_ITEMS,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict, config_dict: dict):
    prints, finite = integrity(state)
    if not finite:  # the train step's guard makes this unreachable; never write such a state
      raise RuntimeError(f'refusing to write checkpoint {step}: the state is not finite')
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_dict),
        integrity=ocp.args.JsonSave({'fingerprints': prints})))

  def read_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))['config']

  def check_compatible(self, step: int, config_dict: dict, saved: dict | None = None):
    """A ConfigError listing the differences if `step` holds another model than config_dict."""
    saved = from_dict(self.read_config(step) if saved is None else saved).to_dict()
    diffs = []
    for section in _STATE_SECTIONS:
      diffs += _diff(saved.get(section, {}), config_dict[section], section)
    if diffs:
      raise ConfigError(
          f'the workdir {self.workdir} holds a checkpoint (step {step}) of a '
          f'different model: ' + '; '.join(diffs) + '. Use a new --workdir, or run with the '
          'config that wrote it.')

  def _saved_config(self, step: int) -> dict:
    try:
      return self.read_config(step)
    except Exception as e:  # noqa: BLE001  Orbax's errors for a missing or broken file
      raise CorruptCheckpoint(f'its config does not read ({_last_line(e)})') from e

  def restore(self, step: int, abstract_state):
    """(state, data state) of `step`, verified; CorruptCheckpoint names what is wrong."""
    step_dir = os.path.join(self.directory, str(step))
    has_record = os.path.isdir(os.path.join(step_dir, 'integrity'))
    items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    if has_record:
      items['integrity'] = ocp.args.JsonRestore()
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001  missing or truncated files: Orbax's many errors
      raise CorruptCheckpoint(f'it does not restore ({_last_line(e)})') from e
    prints, finite = integrity(out['state'])
    if has_record:
      saved = out['integrity']['fingerprints']
      bad = [p for p in saved if prints.get(p) != saved[p]]
      if bad or set(saved) != set(prints):
        raise CorruptCheckpoint(f'array {bad[0] if bad else "set"} differs from the fingerprint '
                                f'written with it ({len(bad)} array(s) differ)')
    if not finite:
      raise CorruptCheckpoint('it holds non-finite values')
    return out['state'], out['data']

  def restore_intact(self, abstract_state, config_dict: dict | None = None, move: bool = True):
    """The newest checkpoint that verifies: (step, state, data state), or None if there is
    none. Newer corrupt ones are reported and (with `move`) moved to checkpoints_corrupt/."""
    steps = self.all_steps()
    failures = []
    for step in reversed(steps):
      try:
        if config_dict is not None:  # another model is refused, not passed over
          self.check_compatible(step, config_dict, self._saved_config(step))
        state, data = self.restore(step, abstract_state)
      except CorruptCheckpoint as e:
        failures.append((step, str(e)))
        continue
      self._set_aside(failures, step, move)
      return step, state, data
    if failures:
      raise ConfigError(
          f'every checkpoint in {self.directory} is corrupt: ' + '; '.join(
              f'step {s}: {why}' for s, why in failures) +
          '. Move them away to start over (nothing was changed)')
    return None

  def _set_aside(self, failures, good_step: int, move: bool):
    if not failures:
      return
    aside = os.path.join(self.workdir, 'checkpoints_corrupt')
    for step, why in failures:
      if not move:
        print(f'warning: checkpoint step {step} is corrupt: {why}; using step {good_step}',
              file=sys.stderr)
        continue
      if jax.process_index() == 0:
        os.makedirs(aside, exist_ok=True)
        target = os.path.join(aside, str(step))
        if os.path.exists(target):
          shutil.rmtree(target)
        shutil.move(os.path.join(self.directory, str(step)), target)
      print(f'warning: checkpoint step {step} is corrupt: {why}; moved to {aside}/{step}, '
            f'resuming from step {good_step}', file=sys.stderr)
    if not move:
      return
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices('moejax_checkpoint_set_aside')
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def _last_line(e: BaseException) -> str:
  """The most telling line of an Orbax / TensorStore error (they run to hundreds of lines)."""
  chain, seen = [], e
  while seen is not None and len(chain) < 8:
    chain.append(seen)
    seen = seen.__cause__ or seen.__context__
  for err in chain:  # a TensorStore status such as DATA_LOSS or NOT_FOUND names the cause
    m = re.search(r'\b(DATA_LOSS|NOT_FOUND|INVALID_ARGUMENT|FAILED_PRECONDITION|OUT_OF_RANGE|'
                  r'INTERNAL|UNKNOWN): [^\n]*', str(err))
    if m:
      return m.group(0).split(' [tensorstore_spec')[0][:240]
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  line = lines[0].split('See full TensorStore')[0].strip() if lines else ''
  return f'{type(e).__name__}: {line[:240]}'


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


def fingerprint_numpy(x: np.ndarray) -> int:
  """The fingerprint of a host array, computed on the host (the tests' independent check)."""
  x = np.asarray(x)
  if x.dtype == np.bool_:
    x = x.astype(np.uint8)
  u = x.view(np.uint32) if x.dtype.itemsize >= 4 else x.view(
      {1: np.uint8, 2: np.uint16}[x.dtype.itemsize]).astype(np.uint32)
  if x.dtype.itemsize > 4:
    u = u.reshape(x.shape + (x.dtype.itemsize // 4,))
  pos = np.arange(u.size, dtype=np.uint64).astype(np.uint32).reshape(u.shape)
  with np.errstate(over='ignore'):
    h = u ^ (pos * np.uint32(0x9E3779B9))
    h = (h ^ (h >> np.uint32(16))) * np.uint32(0x85EBCA6B)
    h = (h ^ (h >> np.uint32(13))) * np.uint32(0xC2B2AE35)
    h = h ^ (h >> np.uint32(16))
  return int(h.astype(np.uint64).sum() % 2**32)
