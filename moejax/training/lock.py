"""One trainer per workdir: WORKDIR/lock, held by JAX process 0 of the run that trains there.

The lock file records the holder (host, pid, start time) and is kept under an exclusive
`fcntl.flock` for as long as the run lives, so on one machine a holder killed with kill -9
releases it at once (the kernel drops the flock) and the next run takes over the stale lock
with a note. A heartbeat thread rewrites the file's mtime every HEARTBEAT seconds: a lock of
another host (a shared filesystem, where flock may not reach across machines) counts as stale
once its heartbeat is older than STALE seconds. The other processes of a multi-host run share
process 0's lock: they never take it.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time

from moejax.errors import ConfigError

HEARTBEAT = 30.0
STALE = 300.0


class WorkdirLock:
  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, 'lock')
    self.enabled = enabled
    self._fd = None
    self._stop = threading.Event()
    self._thread = None

  def acquire(self):
    if not self.enabled:
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise ConfigError(f'{os.path.dirname(self.path)} is in use by another trainer '
                        f'({self._describe(read_holder(self.path))}); wait for it to finish, '
                        'stop it, or use another --workdir') from None
    holder = read_holder(self.path)
    me = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time()}
    if holder:
      age = time.time() - os.path.getmtime(self.path)
      if holder.get('host') != me['host'] and age < STALE:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        raise ConfigError(
            f'{os.path.dirname(self.path)} is in use by another trainer '
            f'({self._describe(holder)}, heartbeat {age:.0f} s ago); a lock whose heartbeat is '
            f'older than {STALE:.0f} s is taken over, or delete {self.path} if that run is gone')
      print(f'note: taking over a stale lock of {self.path} ({self._describe(holder)}, no '
            'longer running)', file=sys.stderr)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + '\n').encode(), 0)
    os.fsync(fd)
    self._fd = fd
    self._thread = threading.Thread(target=self._beat, daemon=True, name='moejax-lock')
    self._thread.start()
    return self

  def _beat(self):
    while not self._stop.wait(HEARTBEAT):
      try:
        os.utime(self.path)
      except OSError:
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
    try:
      os.ftruncate(self._fd, 0)  # released cleanly: no holder to report
      fcntl.flock(self._fd, fcntl.LOCK_UN)
    finally:
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def read_holder(path: str) -> dict:
  try:
    with open(path) as f:
      text = f.read().strip()
    return json.loads(text) if text else {}
  except (OSError, ValueError):
    return {}
