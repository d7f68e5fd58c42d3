"""Text corpora that exist without any download, split into train/validation by file.

'stdlib': the Python standard library's own source files (every machine with Python has them).
'files': user text files or folders, given by path.
The split is by file, decided by a hash of the file's path relative to its root, so it is
stable across machines and runs and no file is in both splits.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import sysconfig

import numpy as np

from moejax.errors import ConfigError

# Bundled third-party code and generated test data are not the standard library's own prose.
_STDLIB_SKIP = ('site-packages', 'dist-packages', '__pycache__', 'test', 'tests', 'idle_test')


def stdlib_root() -> str:
  return sysconfig.get_paths()['stdlib']


def _walk(root: str, pattern: str, skip=()) -> list[tuple[str, str]]:
  """(relative path, absolute path) of files under root matching pattern, sorted."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in skip)
    for f in sorted(filenames):
      if fnmatch.fnmatch(f, pattern):
        full = os.path.join(dirpath, f)
        found.append((os.path.relpath(full, root), full))
  return found


def list_files(source: str, paths: str = '', pattern: str = '*.py') -> list[tuple[str, str]]:
  if source == 'stdlib':
    files = _walk(stdlib_root(), pattern, _STDLIB_SKIP)
    if not files:
      raise ConfigError(f'config.data.file_glob={pattern!r}: matches no file of the Python '
                        f'standard library ({stdlib_root()}); use e.g. \'*.py\'')
    return files
  files, folders = [], 0
  for p in (p for p in paths.split(',') if p):
    if not os.path.exists(p):
      raise ConfigError(f'config.data.paths: {p!r} does not exist; point it at text files '
                        'or folders')
    if os.path.isdir(p):
      folders += 1
      files += [(os.path.join(os.path.basename(os.path.normpath(p)), rel), full)
                for rel, full in _walk(p, pattern)]
    else:
      files.append((os.path.basename(p), p))
  if not files:
    if folders:
      raise ConfigError(f'config.data.file_glob={pattern!r}: matches no file in the folders of '
                        f'config.data.paths={paths!r}; change the glob (e.g. \'*.txt\')')
    raise ConfigError(f'config.data.paths={paths!r}: names no file')
  return files


def split_score(name: str) -> int:
  """A document's place in [0, 10000), by a hash of its name: the split is decided by it."""
  return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], 'little') % 10_000


def is_validation(relpath: str, val_percent: float) -> bool:
  return split_score(relpath) < val_percent * 100


def split_files(files, val_percent: float):
  train = [f for f in files if not is_validation(f[0], val_percent)]
  val = [f for f in files if is_validation(f[0], val_percent)]
  if not train or not val:
    # Tiny user corpora (a single file) still get both splits: the last file is validation.
    if len(files) < 2:
      raise ConfigError(f'config.data.paths: the corpus has {len(files)} file(s); the train/'
                        'validation split is by file, so give at least two files')
    train, val = files[:-1], files[-1:]
  return train, val


def read_bytes(files) -> list[np.ndarray]:
  out = []
  for _, full in files:
    with open(full, 'rb') as f:
      out.append(np.frombuffer(f.read(), dtype=np.uint8))
  return out
