"""The data sources a config can name (data.source) and the data fields each reads."""
from __future__ import annotations

import os

from moejax.config import base_config

# The data fields each source reads (besides data.seq_len and data.vocab_multiple).
DATA_SOURCES = {'stdlib': ('file_glob', 'val_percent', 'max_bytes', 'tokenizer'),
                'files': ('paths', 'file_glob', 'val_percent', 'max_bytes', 'tokenizer'),
                'prepared': ('prepared_dir', 'mixture', 'eval_sets')}


def check(dt, fail) -> None:
  """The data section: a known source, no field it ignores, paths and tokenizer that exist."""
  if dt.source not in DATA_SOURCES:
    fail('data.source', dt.source, f"must be one of {', '.join(DATA_SOURCES)}")
  defaults = base_config().data
  for field in sorted({f for fields in DATA_SOURCES.values() for f in fields}):
    if field not in DATA_SOURCES[dt.source] and dt[field] != defaults[field]:
      readers = [s for s, fields in DATA_SOURCES.items() if field in fields]
      fail(f'data.{field}', dt[field], f"is not read by data.source={dt.source!r} (only by "
           f"{' and '.join(repr(r) for r in readers)}); remove it or change data.source")
  if dt.source == 'files':
    if not dt.paths:
      fail('data.paths', dt.paths, "data.source='files' needs comma-separated paths")
    for p in dt.paths.split(','):
      if not os.path.exists(p):
        fail('data.paths', p, 'this path does not exist; point it at text files or folders')
  if dt.source == 'prepared' and bool(dt.prepared_dir) == bool(dt.mixture):
    fail('data.prepared_dir', dt.prepared_dir, "data.source='prepared' reads one of "
         'data.prepared_dir (one corpus) and data.mixture (several); set exactly one')
  if dt.source != 'prepared' and dt.tokenizer != 'bytes' and not os.path.exists(dt.tokenizer):
    fail('data.tokenizer', dt.tokenizer, "no such file; give 'bytes', a tokenizer.json (or its "
         'folder) or a SentencePiece .model file')
