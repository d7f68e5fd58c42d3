"""Documents from the user's files, streamed: text files, JSONL (one document per line, in a
text field) and Parquet (a text column), found in files and folders by glob patterns.

Each document is (name, text); the name is stable across machines (the file's path relative to
the folder given, plus ':LINE' or ':ROW'), and its hash decides the train/validation split.
'stdlib' as an input is Python's standard library with the byte corpus's rules, so a prepared
standard library splits exactly as `data.source='stdlib'` does.
"""
from __future__ import annotations

import collections
import dataclasses
import fnmatch
import json
import os

from moejax.errors import ConfigError
from moejax.data import corpus

# Folders never walked into: hidden ones, virtual environments and caches.
SKIP_DIRS = ('__pycache__', 'node_modules', 'site-packages', 'dist-packages', 'venv', 'env')


def _skipped_dir(dirpath: str, name: str) -> bool:
  return (name.startswith('.') or name in SKIP_DIRS
          or os.path.exists(os.path.join(dirpath, name, 'pyvenv.cfg')))


def find_files(inputs: str, file_glob: str, left_out: collections.Counter | None = None
               ) -> list[tuple[str, str]]:
  """(name, path) of every input file, sorted within each input; one-line errors. left_out, if
  given, counts the files in the folders that the patterns do not match, by extension ('' for
  none; hidden files and skipped folders aside)."""
  patterns = [g.strip() for g in file_glob.split(',') if g.strip()]
  files = []
  for p in (p.strip() for p in inputs.split(',') if p.strip()):
    if p == 'stdlib':
      files += [(r, f) for pattern in patterns
                for r, f in corpus.list_files('stdlib', pattern=pattern)]
      continue
    if not os.path.exists(p):
      raise ConfigError(f'--inputs: {p!r} does not exist; give files or folders, comma-separated')
    if not os.path.isdir(p):
      files.append((os.path.basename(p), p))
      continue
    root, found = os.path.normpath(p), []
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = sorted(d for d in dirnames if not _skipped_dir(dirpath, d))
      for f in sorted(filenames):
        if f.startswith('.'):
          continue
        if any(fnmatch.fnmatch(f, g) for g in patterns):
          full = os.path.join(dirpath, f)
          found.append((os.path.join(os.path.basename(root), os.path.relpath(full, root)), full))
        elif left_out is not None:
          left_out[os.path.splitext(f)[1].lower()] += 1
    if not found:
      raise ConfigError(f'--file_glob={file_glob!r}: matches no file in {p!r}; change the glob '
                        "(several patterns, comma-separated: e.g. '*.md,*.txt,*.py')")
    files += found
  if not files:
    raise ConfigError(f'--inputs={inputs!r}: names no file')
  return files


def left_out_note(left_out: collections.Counter, file_glob: str) -> str:
  """One line on the files the patterns left out ('' when none), and how to take them."""
  if not left_out:
    return ''
  kinds = [f'{n} without an extension' if ext == '' else f'{n} *{ext}'
           for ext, n in sorted(left_out.items(), key=lambda kv: (-kv[1], kv[0]))]
  kinds = ', '.join(kinds[:6]) + (f', and {len(kinds) - 6} more kinds' if len(kinds) > 6 else '')
  total = sum(left_out.values())
  return (f"left out {total} file{'s' * (total != 1)} that --file_glob={file_glob!r} does not "
          f"match ({kinds}); to take them, add their patterns to --file_glob (e.g. "
          f"'LICENSE*,*.rst'), or --file_glob='*' for every file")


@dataclasses.dataclass
class Skipped:
  """JSONL lines (or Parquet rows) that had no text, per file."""
  counts: dict = dataclasses.field(default_factory=dict)

  def add(self, path: str, why: str):
    self.counts[(path, why)] = self.counts.get((path, why), 0) + 1

  def lines(self) -> list[str]:
    return [f'warning: {path}: {n} line(s) skipped: {why}'
            for (path, why), n in sorted(self.counts.items())]


def _jsonl(name: str, path: str, field: str, skipped: Skipped):
  with open(path, encoding='utf-8', errors='replace') as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except ValueError:
        skipped.add(path, 'not valid JSON')
        continue
      text = row.get(field) if isinstance(row, dict) else None
      if not isinstance(text, str):
        skipped.add(path, f'no text field {field!r} (set --text_field)')
        continue
      yield f'{name}:{i}', text


def _parquet(name: str, path: str, field: str, skipped: Skipped):
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise ConfigError(f'{path}: reading Parquet needs pyarrow: pip install '
                      "'moejax[data]'") from None
  pf = pq.ParquetFile(path)
  if field not in pf.schema_arrow.names:
    raise ConfigError(f'{path}: no column {field!r} (it has {", ".join(pf.schema_arrow.names)});'
                      ' set --text_field')
  row = 0
  for batch in pf.iter_batches(columns=[field], batch_size=1024):
    for text in batch.column(0).to_pylist():
      if isinstance(text, str):
        yield f'{name}:{row}', text
      else:
        skipped.add(path, f'{field!r} is empty')
      row += 1


def read(files, text_field: str, skipped: Skipped):
  """Yield (name, text, bytes read from disk) for every document, in input order; a file that
  cannot be read is one error line naming it."""
  for name, path in files:
    try:
      yield from _read_file(name, path, text_field, skipped)
    except ConfigError:
      raise
    except Exception as e:  # noqa: BLE001  OSError, a Parquet or encoding error: name the file
      raise ConfigError(f'{path}: cannot be read ({type(e).__name__}: '
                        f'{str(e).splitlines()[0] if str(e) else ""}); fix or remove it, or '
                        'narrow --inputs / --file_glob') from None


def _read_file(name: str, path: str, text_field: str, skipped: Skipped):
  if path.endswith('.jsonl'):
    for doc in _jsonl(name, path, text_field, skipped):
      yield *doc, 0
    yield '', None, os.path.getsize(path)  # progress: the whole file is read
  elif path.endswith('.parquet'):
    for doc in _parquet(name, path, text_field, skipped):
      yield *doc, 0
    yield '', None, os.path.getsize(path)
  else:
    with open(path, 'rb') as f:
      data = f.read()
    yield name, data.decode('utf-8', errors='replace'), len(data)
