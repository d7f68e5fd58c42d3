"""Never lose a good state: checkpoint integrity and fallback, the divergence guard, the
workdir lock, metrics.jsonl repair. One test (at least) per defect of issue #12."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moejax.errors import Diverged
from moejax.checks import validate
from moejax.errors import ConfigError
from moejax.training.guard import Guard
from moejax.training.checkpoint import Checkpointer, fingerprint_numpy, integrity
from moejax.training.lock import WorkdirLock
from moejax.training.loop import train
from moejax.training.metrics import read_metrics, truncate_after

from conftest import tiny_config


def _rows(workdir):
  return read_metrics(os.path.join(workdir, 'metrics.jsonl'))


def _losses(workdir):
  return {r['step']: r['train/loss'] for r in _rows(workdir) if 'train/loss' in r}


@pytest.fixture(scope='module')
def full_run(tmp_path_factory):
  """An uninterrupted 6-step run with checkpoints at steps 3 and 6."""
  d = str(tmp_path_factory.mktemp('full'))
  train(tiny_config(), d)
  return d


def _data_files(step_dir):
  """The OCDBT data files (in folders named d/) of a checkpoint's state. OCDBT appends, so
  some bytes of a file may be superseded and never read: a flip there changes nothing that is
  restored (checked: the state restores bit-identical), hence the damage goes to every file."""
  return [os.path.join(root, n) for root, _, names in os.walk(os.path.join(step_dir, 'state'))
          if os.path.basename(root) == 'd' for n in names]


# ---- 1. A corrupted checkpoint is detected, reported in one line, and passed over.

def test_fingerprint_equals_host_reference_on_any_mesh():
  """The on-device fingerprint (jit, sharded over 8 devices) equals a NumPy transcription, for
  several dtypes; one flipped bit or two swapped elements change it."""
  rng = np.random.default_rng(0)
  arrays = {'f32': rng.normal(size=(8, 6)).astype(np.float32),
            'i32': rng.integers(-9, 9, size=(16,)).astype(np.int32),
            'bf16': rng.normal(size=(8, 3)).astype(jnp.bfloat16),
            'bool': rng.random((8,)) > 0.5}
  mesh = jax.make_mesh((8,), ('x',))
  sharded = {k: jax.device_put(v, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec('x'))) for k, v in arrays.items()}
  prints, finite = integrity(sharded)
  assert finite
  for k, v in arrays.items():
    assert prints[f"['{k}']"] == fingerprint_numpy(v), k
  flipped = arrays['f32'].copy()
  flipped.view(np.uint32)[3, 2] ^= 1 << 7
  swapped = arrays['f32'].copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  base = fingerprint_numpy(arrays['f32'])
  assert fingerprint_numpy(flipped) != base and fingerprint_numpy(swapped) != base
  assert integrity({'a': jnp.array([1.0, jnp.nan])})[1] is False


@pytest.mark.parametrize('damage', ['flip_bytes', 'delete_manifest', 'truncate'])
def test_corrupt_latest_checkpoint_falls_back(full_run, tmp_path, capfd, damage):
  """Step 6 damaged three ways: the run warns in one line naming step 6 and the cause, moves
  it to checkpoints_corrupt/6, resumes from step 3 and recomputes steps 4-6 bit-identically."""
  d = str(tmp_path / 'run')
  shutil.copytree(full_run, d)
  step_dir = os.path.join(d, 'checkpoints', '6')
  if damage == 'flip_bytes':
    for path in _data_files(step_dir):
      data = bytearray(open(path, 'rb').read())
      mid = len(data) // 2
      data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
      open(path, 'wb').write(bytes(data))
  elif damage == 'delete_manifest':
    os.remove(os.path.join(step_dir, 'state', 'manifest.ocdbt'))
  else:
    for path in _data_files(step_dir):
      os.truncate(path, os.path.getsize(path) // 2)
  capfd.readouterr()
  train(tiny_config(), d)
  err = capfd.readouterr().err
  lines = [l for l in err.splitlines() if l.strip()]
  assert lines[0].startswith('warning: checkpoint step 6 is corrupt'), err
  assert 'resuming from step 3' in lines[0] and len(lines[0]) < 600
  assert lines[1:] == ['resuming from checkpoint step 3'], err
  assert 'Traceback' not in err
  assert os.path.isdir(os.path.join(d, 'checkpoints_corrupt', '6'))
  assert sorted(os.listdir(os.path.join(d, 'checkpoints'))) == ['3', '6']
  assert _losses(d) == _losses(full_run)
  assert [r['step'] for r in _rows(d)] == list(range(7))


def test_every_checkpoint_corrupt_is_refused_untouched(full_run, tmp_path):
  d = str(tmp_path / 'run')
  shutil.copytree(full_run, d)
  for step in ('3', '6'):
    os.remove(os.path.join(d, 'checkpoints', step, 'state', 'manifest.ocdbt'))
  with pytest.raises(ConfigError, match='every checkpoint .* is corrupt: step 6: .*step 3'):
    train(tiny_config(), d)
  assert sorted(os.listdir(os.path.join(d, 'checkpoints'))) == ['3', '6']
  assert not os.path.exists(os.path.join(d, 'checkpoints_corrupt'))


# ---- 2. NaN and inf are refused in every numeric field.

@pytest.mark.parametrize('field,value', [('train.lr', float('nan')), ('train.lr', float('inf')),
                                         ('train.grad_clip', float('-inf')),
                                         ('model.moe.balance.aux_loss_weight', float('nan')),
                                         ('model.rope_theta', float('inf')),
                                         ('model.moe.dispatch.capacity_factor', float('nan'))])
def test_nan_and_inf_are_refused(field, value):
  c = tiny_config()
  *path, last = field.split('.')
  node = c
  for p in path:
    node = node[p]
  node[last] = value
  with pytest.raises(ConfigError, match=f'config.{field}={value!r}: must be a finite number'):
    validate(c, 8)


# ---- 3. Divergence: never applied, never written, and the run says so.

def _diverging(**train):
  c = tiny_config()
  c.train.lr = 1e6  # gives a NaN gradient at step 3
  for k, v in train.items():
    c.train[k] = v
  return c


def test_divergence_stops_with_one_line_and_writes_nothing_nonfinite(tmp_path):
  d = str(tmp_path / 'run')
  with pytest.raises(Diverged) as e:
    train(_diverging(), d)
  msg = str(e.value)
  assert msg.startswith('step 3: the loss') and 'not finite' in msg
  assert 'train.nonfinite=skip or rollback' in msg and '\n' not in msg
  # Step 3 was a checkpoint step: nothing was written for it, nor after.
  assert not os.path.exists(os.path.join(d, 'checkpoints', '3'))
  rows = _rows(d)
  assert [r['step'] for r in rows] == [0, 1, 2, 3] and rows[-1]['train/finite'] is False


def test_skip_keeps_the_last_finite_state_and_every_checkpoint_restores(tmp_path):
  """Steps 3-6 are not finite and skipped (4 in a row <= max_nonfinite=5): the checkpoints of
  steps 3 and 6 hold the same (finite) parameters, those of the state after step 2, and with
  keep_checkpoints=1 the newest finite checkpoint is the one kept."""
  d = str(tmp_path / 'run')
  last = train(_diverging(nonfinite='skip', keep_checkpoints=1), d)
  assert last['step'] == 6 and last['train/skipped_steps'] == 4
  c = _diverging()
  from moejax.parallel.mesh import make_mesh
  from moejax.training.step import Trainer
  trainer = Trainer(c, make_mesh(validate(c, jax.device_count())))
  ck = Checkpointer(d, 10)
  assert ck.all_steps() == [6]
  state, _ = ck.restore(6, trainer.abstract_state)  # verifies fingerprints and finiteness
  ck.close()
  assert int(state.step) == 6
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.params))


def test_skip_gives_up_after_max_nonfinite_in_a_row(tmp_path):
  with pytest.raises(Diverged, match=r'step 5: .* 3 steps in a row .*max_nonfinite=2'):
    train(_diverging(nonfinite='skip', max_nonfinite=2), str(tmp_path / 'run'))


def test_rollback_restores_and_skips_the_batches_up_to_the_bad_one(tmp_path, monkeypatch):
  """Step 5 is made non-finite once: the run goes back to the step-3 checkpoint, skips
  batches 4-5, and trains steps 4-6 on batches 6-8. Each step is logged once, and the step-6
  checkpoint's data position is 8 batches, as a fresh iterator's after 8 batches."""
  real = Guard.ok
  seen = []

  def ok(self, step, metrics):
    if step == 5 and not seen:
      seen.append(step)
      metrics = {**metrics, 'train/finite': jnp.array(False)}
    return real(self, step, metrics)
  monkeypatch.setattr(Guard, 'ok', ok)
  d = str(tmp_path / 'run')
  c = tiny_config()
  c.train.nonfinite = 'rollback'
  train(c, d)
  assert seen == [5]
  assert [r['step'] for r in _rows(d)] == list(range(7))
  ck = Checkpointer(d, 10)
  data = ck.manager.restore(6, args=ocp.args.Composite(data=ocp.args.JsonRestore()))['data']
  ck.close()
  assert data == {'next_index': 8}


# ---- 4 and 6. metrics.jsonl: torn last line, and each step exactly once.

def test_torn_line_is_dropped_with_a_warning(tmp_path, capsys):
  p = str(tmp_path / 'metrics.jsonl')
  with open(p, 'w') as f:
    f.write('{"step": 0}\n{"step": 1, "x": 2}\n{"step": 2, "x"')
  assert read_metrics(p) == [{'step': 0}, {'step': 1, 'x': 2}]
  assert 'dropped its last line' in capsys.readouterr().err
  truncate_after(p, 0)
  assert open(p).read() == '{"step": 0}\n'


def test_restart_before_first_checkpoint_logs_each_step_once(tmp_path):
  """A run killed before its first checkpoint left rows 0-2 and a torn line: the restart
  trains from scratch, writes every step exactly once, and plots."""
  d = str(tmp_path / 'run')
  os.makedirs(d)
  with open(os.path.join(d, 'metrics.jsonl'), 'w') as f:
    for s in range(3):
      f.write(json.dumps({'step': s, 'train/loss': 9.0}) + '\n')
    f.write('{"step": 3, "train/lo')
  train(tiny_config(), d)
  assert [r['step'] for r in _rows(d)] == list(range(7))
  assert 9.0 not in _losses(d).values()
  assert os.path.exists(os.path.join(d, 'expert_load.png'))


# ---- 5. The workdir lock.

_HOLDER = ('import sys, time; from moejax.training.lock import WorkdirLock; '
           'WorkdirLock(sys.argv[1]).acquire(); print("held", flush=True); time.sleep(600)')


def test_second_trainer_is_refused_and_a_stale_lock_taken_over(tmp_path, capfd):
  d = str(tmp_path / 'run')
  os.makedirs(d)
  holder = subprocess.Popen([sys.executable, '-c', _HOLDER, d], stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(ConfigError, match=f'is in use by another trainer .*pid {holder.pid}'):
      train(tiny_config(), d)
    assert not os.path.exists(os.path.join(d, 'metrics.jsonl'))  # refused before writing
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  capfd.readouterr()
  lock = WorkdirLock(d).acquire()  # the kill -9 left the holder's record: stale, taken over
  assert 'stale lock' in capfd.readouterr().err
  lock.release()
  with WorkdirLock(d):
    pass
  assert 'stale' not in capfd.readouterr().err  # a clean release leaves no holder behind


def _foreign_lock(d, beat=0, host='elsewhere'):
  """The lock file of a trainer on another host, written whole (never seen empty)."""
  with open(os.path.join(d, 'lock.tmp'), 'w') as f:
    json.dump({'host': host, 'pid': 1, 'started': 0.0, 'beat': beat}, f)
  os.replace(os.path.join(d, 'lock.tmp'), os.path.join(d, 'lock'))


def test_lock_of_another_host_is_refused_while_its_heartbeat_goes_on(tmp_path, monkeypatch,
                                                                      capfd):
  """A lock written by another host (a shared filesystem) whose heartbeat count moves is a
  live trainer: refused, after watching it for at most WATCH heartbeats."""
  from moejax.training import lock
  monkeypatch.setattr(lock, 'HEARTBEAT', 0.2)
  d = str(tmp_path)
  _foreign_lock(d)
  stop = threading.Event()

  def beat():
    n = 0
    while not stop.wait(0.05):
      n += 1
      _foreign_lock(d, n)
  t = threading.Thread(target=beat)
  t.start()
  try:
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r'in use by another trainer \(host elsewhere, pid 1, '
                       r'its heartbeat still going'):
      WorkdirLock(d).acquire()
    assert time.monotonic() - start < lock.WATCH * lock.HEARTBEAT
  finally:
    stop.set()
    t.join()
  assert 'watching its heartbeat' in capfd.readouterr().err
  assert lock.read_holder(os.path.join(d, 'lock'))['host'] == 'elsewhere'  # left as it was


def test_lock_of_a_lost_host_is_taken_over_after_its_heartbeat_stops(tmp_path, monkeypatch,
                                                                      capfd):
  """A preempted host that never released its lock (killed past its grace period): a fresh
  file whose heartbeat count stands still for WATCH heartbeats is taken over, long before
  STALE; a heartbeat older than STALE is taken over without watching; an emptied lock (a
  run that ended) at once."""
  from moejax.training import lock
  monkeypatch.setattr(lock, 'HEARTBEAT', 0.2)
  d = str(tmp_path)
  path = os.path.join(d, 'lock')
  _foreign_lock(d, host='elsewhere.' + 'x' * 200)  # a longer record than the new holder's
  start = time.monotonic()
  held = WorkdirLock(d).acquire()
  waited = time.monotonic() - start
  assert lock.WATCH * lock.HEARTBEAT <= waited < lock.STALE
  err = capfd.readouterr().err
  assert 'watching its heartbeat' in err and 'taking over a stale lock' in err
  assert lock.read_holder(path)['pid'] == os.getpid()  # written over whole, no tail left
  time.sleep(2.5 * lock.HEARTBEAT)  # the new holder's own heartbeat counts on
  assert lock.read_holder(path)['beat'] >= 1
  held.release()
  assert lock.read_holder(path) == {}
  _foreign_lock(d)
  old = time.time() - lock.STALE - 1
  os.utime(path, (old, old))
  WorkdirLock(d).acquire().release()  # heartbeat older than STALE: no watch
  err = capfd.readouterr().err
  assert 'watching' not in err and 'taking over' in err
  WorkdirLock(d).acquire().release()  # emptied by the release: nothing to report
  assert capfd.readouterr().err == ''
  # A holder elsewhere that finishes (empties the file) while it is watched: taken at once.
  _foreign_lock(d)
  threading.Timer(0.1, lambda: open(path, 'w').close()).start()
  start = time.monotonic()
  WorkdirLock(d).acquire().release()
  assert time.monotonic() - start < lock.WATCH * lock.HEARTBEAT


def test_lock_on_a_filesystem_without_file_locks_relies_on_the_heartbeat(tmp_path, monkeypatch,
                                                                         capfd):
  """flock failing with ENOLCK (some FUSE mounts): a holder on this very host is watched like
  one elsewhere (no kernel lock to tell), refused while it beats, taken over once it stops."""
  import errno
  from moejax.training import lock

  def no_locks(fd, op):
    raise OSError(errno.ENOLCK, 'No locks available')
  monkeypatch.setattr(lock.fcntl, 'flock', no_locks)
  monkeypatch.setattr(lock, 'HEARTBEAT', 0.2)
  d = str(tmp_path)
  first = WorkdirLock(d).acquire()  # nothing there: taken without watching
  assert 'no file locks' in capfd.readouterr().err
  with pytest.raises(ConfigError, match='heartbeat still going'):
    WorkdirLock(d).acquire()  # the same host's live holder, told by its beats
  first._stop.set()  # the holder hangs (no more beats) without releasing
  first._thread.join()
  WorkdirLock(d).acquire().release()
  assert 'taking over a stale lock' in capfd.readouterr().err


# ---- Friendliness.

def test_finished_run_is_reported_and_tensorboard_records_the_config(full_run):
  last = train(tiny_config(), full_run)  # its step-6 checkpoint verifies: nothing to do
  assert last['finished'] and last['step'] == 6 and 'eval/loss' in last
  assert [r['step'] for r in _rows(full_run)] == list(range(7))
  events = [os.path.join(full_run, 'tensorboard', f)
            for f in os.listdir(os.path.join(full_run, 'tensorboard'))]
  blob = b''.join(open(e, 'rb').read() for e in events)
  assert b'nonfinite: stop' in blob and b'num_experts: 8' in blob


def test_rollback_gives_up_when_every_retry_diverges(tmp_path, capfd):
  """Checkpoints at steps 1 and 2, step 3 diverges: back to step 2 (batch 3 skipped), and
  again on each retry; after max_nonfinite=2 rollbacks without a new checkpoint it stops
  (a restore is not progress, so the count is not reset by it)."""
  c = _diverging(nonfinite='rollback', max_nonfinite=2, checkpoint_every=1)
  with pytest.raises(Diverged, match='2 rollbacks did not reach a new checkpoint'):
    train(c, str(tmp_path / 'run'))
  err = capfd.readouterr().err
  assert err.count('rolled back to step 2') == 2, err
