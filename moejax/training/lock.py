"""One trainer per workdir: WORKDIR/lock, held by JAX process 0 of the run that trains there,
and honoured by every process of a multi-host launch.

The lock file records the holder (host, pid, start time, a heartbeat count) and is kept under
an exclusive `fcntl.flock` for as long as the run lives, so on one machine a holder killed with
kill -9 releases it at once (the kernel drops the flock) and the next run takes over the stale
lock with a note. A heartbeat thread rewrites the file every HEARTBEAT seconds with the next
count. A lock of another host (a shared filesystem, where flock may not reach across machines)
is watched: its count moving within WATCH heartbeats means a live trainer (refused); a still
count means the holder is gone (a preempted or lost host), and the lock is taken over, so a
resume on another host waits at most WATCH heartbeats and is never refused by a dead run. The
count is read from the file's contents, which NFS's close-to-open consistency refreshes on
every open, unlike a cached mtime. A run that ends (finished, preempted with its checkpoint,
refused, diverged) empties the file: no holder left to report.

Several processes: process 0 takes the lock and tells the others (one broadcast) whether it
did, so a busy workdir refuses the launch on every host with the same line, before any
compile, and no process is left waiting for peers that have gone.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time

from moejax.errors import ConfigError

# errnos of a filesystem that cannot lock files (the heartbeat guards alone)
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
HEARTBEAT = 30.0
WATCH = 2.5  # heartbeats to watch another host's lock for a beat
STALE = 300.0  # a heartbeat this old is gone without watching


class WorkdirLock:
  """WORKDIR/lock for the run's lifetime; `enabled` is process 0 (the others never take it)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, 'lock')
    self.enabled = enabled
    self._fd = None
    self._me = {}
    self._stop = threading.Event()
    self._thread = None

  def acquire(self):
    """Take the lock (ConfigError, one line, if another trainer holds it)."""
    if not self.enabled:
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      self._take(fd)
    except BaseException:
      os.close(fd)
      raise
    self._fd = fd
    self._thread = threading.Thread(target=self._beat, daemon=True, name='moejax-lock')
    self._thread.start()
    return self

  def _take(self, fd):
    self._me = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time(),
                'beat': 0}
    holder, watched = read_holder(self.path), False
    elsewhere = bool(holder) and holder.get('host') != self._me['host']
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if not isinstance(e, BlockingIOError) and e.errno in _NO_LOCKS:
        # A filesystem without locks (some FUSE mounts): the heartbeat alone tells, for a
        # holder on this host as for one elsewhere.
        print(f'note: {self.path}: the filesystem has no file locks; the heartbeat alone '
              'guards the workdir', file=sys.stderr)
        elsewhere = bool(holder)
      elif not isinstance(e, BlockingIOError):
        raise ConfigError(f'{self.path}: cannot lock it ({e.strerror})') from None
      else:
        # On one host the flock is the truth: its holder lives. Across hosts (a file server
        # that shares locks) a lost host's lock outlives it until the server's lease ends.
        if not elsewhere or self._beats(holder):
          raise self._busy(holder) from None
        watched = True
        self._wait_for_lease(fd, holder)
    if elsewhere and not watched:
      age = time.time() - os.path.getmtime(self.path)
      if age < STALE and self._beats(holder):
        _unlock(fd)
        raise self._busy(holder, f', its heartbeat still going ({HEARTBEAT:.0f} s apart)')
    if holder:
      print(f'note: taking over a stale lock of {self.path} ({self._describe(holder)}, no '
            'longer running)', file=sys.stderr)
    self._write(fd)
    if elsewhere:
      # Two launches on two hosts may both have seen the same dead holder: the later write
      # wins, and the other steps back.
      time.sleep(min(1.0, HEARTBEAT / 10))
      now = read_holder(self.path)
      if (now.get('host'), now.get('pid')) != (self._me['host'], self._me['pid']):
        _unlock(fd)
        raise self._busy(now)

  def _wait_for_lease(self, fd, holder: dict):
    """Take the flock of a lost host once the file server lets it go (at most STALE s)."""
    deadline = time.monotonic() + STALE
    while True:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
      except BlockingIOError:
        if time.monotonic() > deadline:
          raise self._busy(holder, f', its heartbeat stopped but the file server still holds '
                           f'its lock after {STALE:.0f} s; delete {self.path} if that run is '
                           'gone') from None
        time.sleep(1.0)

  def _beats(self, holder: dict) -> bool:
    """Whether another host's holder rewrites its heartbeat within WATCH heartbeats."""
    deadline = time.monotonic() + WATCH * HEARTBEAT
    print(f'note: {self.path} is held by {self._describe(holder)}; watching its heartbeat for '
          f'up to {WATCH * HEARTBEAT:.0f} s to tell a running trainer from a lost one',
          file=sys.stderr)
    before = _read_text(self.path)
    while time.monotonic() < deadline:
      time.sleep(min(HEARTBEAT / 10, max(0.0, deadline - time.monotonic())))
      now = _read_text(self.path)
      if now != before:
        return bool(now)  # a new count (or a half-written one): alive; emptied: released
    return False

  def _busy(self, holder: dict, extra: str = '') -> ConfigError:
    return ConfigError(f'{os.path.dirname(self.path)} is in use by another trainer '
                       f'({self._describe(holder)}{extra}); wait for it to finish, stop it, '
                       f'or use another --workdir')

  def _write(self, fd):
    # Write over, then cut to length: a reader never sees the file empty mid-beat.
    data = (json.dumps(self._me) + '\n').encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))
    os.fsync(fd)

  def _beat(self):
    while not self._stop.wait(HEARTBEAT):
      try:
        self._me['beat'] += 1
        self._write(self._fd)
      except (OSError, TypeError):
        pass

  @staticmethod
  def _describe(holder: dict) -> str:
    if not holder:
      return 'holder unknown'
    return f"host {holder.get('host')}, pid {holder.get('pid')}"

  def release(self):
    if self._fd is None:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    try:
      os.ftruncate(self._fd, 0)  # released cleanly: no holder to report
      _unlock(self._fd)
    finally:
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self if self._fd is not None else self.acquire()

  def __exit__(self, *exc):
    self.release()


def lock_workdir(workdir: str) -> WorkdirLock:
  """The run's lock, taken by process 0 and agreed by every process: a refusal raises the same
  ConfigError on every host (one broadcast when there are several processes)."""
  import jax
  lock = WorkdirLock(workdir, enabled=jax.process_index() == 0)
  refusal = None
  try:
    lock.acquire()
  except ConfigError as e:
    refusal = e
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils
    refused = bool(multihost_utils.broadcast_one_to_all(np.int32(refusal is not None)))
    if refused and refusal is None:
      refusal = lock._busy(read_holder(lock.path), ', found by process 0')
  if refusal is not None:
    raise refusal
  return lock


def _unlock(fd):
  try:
    fcntl.flock(fd, fcntl.LOCK_UN)
  except OSError:  # a filesystem without locks
    pass


def _read_text(path: str) -> str:
  try:
    with open(path) as f:  # a fresh open: NFS revalidates the contents
      return f.read().strip()
  except OSError:
    return ''


def read_holder(path: str) -> dict:
  try:
    with open(path) as f:
      text = f.read().strip()
    return json.loads(text) if text else {}
  except (OSError, ValueError):
    return {}
