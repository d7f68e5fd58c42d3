"""Token shards on disk, written by `python -m moejax.prepare` and read by random access.

A prepared folder holds, per split ('train', 'validation'), shards numbered from 0:
- `SPLIT-NNNNN.array_record` (Grain's random-access format, one record per document) or
  `SPLIT-NNNNN.bin` (flat tokens, the nanoGPT/OLMo convention), uint16 when the vocabulary fits
  in 16 bits, else uint32. Every document ends with the tokenizer's EOS.
- `SPLIT-NNNNN.idx.npy`: int64 end offset (in tokens) of each document in the shard.
- `SPLIT-NNNNN.json`: the shard's record (tokens, documents, text bytes, the input index of its
  last document, file sizes and CRC32), written last, after the data and index were renamed
  into place: a shard without it, or whose files disagree with it, was never finished.
plus the tokenizer's files, `prepare.json` (the settings) and `metadata.json` (written when the
whole corpus is done: tokenizer, vocabulary size, and per split the counts and shard records).

Bytes per token, for bits per byte: each document's UTF-8 bytes plus one for its EOS (as a
newline would be), so for the byte tokenizer tokens and bytes are equal.
"""
from __future__ import annotations

import json
import os
import zlib

import numpy as np

from moejax.errors import ConfigError

FORMATS = ('array_record', 'bin')
SPLITS = ('train', 'validation')
EXT = {'array_record': '.array_record', 'bin': '.bin'}


def token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def shard_name(split: str, index: int) -> str:
  return f'{split}-{index:05d}'


def _crc(path: str) -> int:
  crc = 0
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 16):
      crc = zlib.crc32(chunk, crc)
  return crc


def _write_json(path: str, obj) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(path + '.tmp', path)


class ShardWriter:
  """Buffers one split's documents and writes a shard each time shard_tokens are reached.
  Holds at most shard_tokens + one document's tokens."""

  def __init__(self, out_dir: str, split: str, fmt: str, dtype, shard_tokens: int,
               index: int = 0):
    self.out_dir, self.split, self.fmt, self.dtype = out_dir, split, fmt, np.dtype(dtype)
    self.shard_tokens, self.index = shard_tokens, index
    self.docs, self.nbytes, self.first, self.last, self.buffered = [], 0, None, None, 0
    self.peak_buffered = 0  # tokens held at once (the memory bound, checked by the tests)
    self.written = 0  # shards written by this writer

  def add(self, tokens: np.ndarray, nbytes: int, doc_index: int) -> None:
    self.docs.append(np.asarray(tokens, self.dtype))
    self.buffered += len(tokens)
    self.peak_buffered = max(self.peak_buffered, self.buffered)
    self.nbytes += nbytes
    self.first = doc_index if self.first is None else self.first
    self.last = doc_index
    if self.buffered >= self.shard_tokens:
      self.flush()

  def flush(self) -> dict | None:
    if not self.docs:
      return None
    base = os.path.join(self.out_dir, shard_name(self.split, self.index))
    data = base + EXT[self.fmt]
    ends = np.cumsum([len(d) for d in self.docs], dtype=np.int64)
    if self.fmt == 'bin':
      with open(data + '.tmp', 'wb') as f:
        for d in self.docs:
          f.write(d.tobytes())
    else:
      from array_record.python.array_record_module import ArrayRecordWriter
      w = ArrayRecordWriter(data + '.tmp', 'group_size:1')
      for d in self.docs:
        w.write(d.tobytes())
      w.close()
    with open(base + '.idx.npy.tmp', 'wb') as f:
      np.save(f, ends)
    os.replace(data + '.tmp', data)
    os.replace(base + '.idx.npy.tmp', base + '.idx.npy')
    record = {'file': os.path.basename(data), 'file_bytes': os.path.getsize(data),
              'crc32': _crc(data), 'index_bytes': os.path.getsize(base + '.idx.npy'),
              'tokens': int(ends[-1]), 'docs': len(self.docs), 'bytes': self.nbytes,
              'first_doc': self.first, 'last_doc': self.last}
    _write_json(base + '.json', record)  # last: the shard is complete
    self.written += 1
    self.docs, self.nbytes, self.first, self.last, self.buffered = [], 0, None, None, 0
    self.index += 1
    return record


def shard_problem(out_dir: str, record: dict) -> str | None:
  """Why a recorded shard cannot be read ('' means it is intact)."""
  data = os.path.join(out_dir, record['file'])
  idx = data[:-len(os.path.splitext(data)[1])] + '.idx.npy'
  for path, size in ((data, record['file_bytes']), (idx, record['index_bytes'])):
    if not os.path.exists(path):
      return f'{os.path.basename(path)} is missing'
    if os.path.getsize(path) != size:
      return (f'{os.path.basename(path)} is truncated or overwritten ({os.path.getsize(path)} '
              f'bytes, {size} recorded)')
  if _crc(data) != record['crc32']:
    return f'{record["file"]} is corrupt (its CRC32 differs from the recorded one)'
  return None


def complete_shards(out_dir: str, split: str) -> list[dict]:
  """The records of split's intact shards 0..k-1 (the prefix a re-run keeps)."""
  out, i = [], 0
  while True:
    path = os.path.join(out_dir, shard_name(split, i) + '.json')
    if not os.path.exists(path):
      return out
    with open(path) as f:
      try:
        record = json.load(f)
      except ValueError:
        return out
    if shard_problem(out_dir, record):
      return out
    out.append(record)
    i += 1


class ArrayTokens:
  """An in-memory token stream."""

  def __init__(self, tokens: np.ndarray, num_bytes: int, num_docs: int):
    self.tokens, self.num_bytes, self.num_docs = tokens, num_bytes, num_docs

  def __len__(self):
    return len(self.tokens)

  def slice(self, a: int, b: int) -> np.ndarray:
    return np.asarray(self.tokens[a:b], np.int32)


class ShardedTokens:
  """A split's shards read as one token stream by random access (memory-mapped .bin, or
  ArrayRecord records found through the document index): nothing is loaded up front."""

  def __init__(self, out_dir: str, records: list[dict], fmt: str, dtype):
    self.fmt, self.dtype = fmt, np.dtype(dtype)
    sizes = [r['tokens'] for r in records]
    self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    self.num_bytes = sum(r['bytes'] for r in records)
    self.num_docs = sum(r['docs'] for r in records)
    self.paths = [os.path.join(out_dir, r['file']) for r in records]
    self._open = {}

  def __len__(self):
    return int(self.starts[-1])

  def _shard(self, i: int):
    if i not in self._open:
      path = self.paths[i]
      if self.fmt == 'bin':
        self._open[i] = np.memmap(path, dtype=self.dtype, mode='r')
      else:
        from array_record.python.array_record_module import ArrayRecordReader
        ends = np.load(path[:-len('.array_record')] + '.idx.npy')
        self._open[i] = (ArrayRecordReader(path), ends)
    return self._open[i]

  def _read(self, i: int, a: int, b: int) -> np.ndarray:
    """Tokens [a, b) of shard i."""
    shard = self._shard(i)
    if self.fmt == 'bin':
      return np.asarray(shard[a:b])
    reader, ends = shard
    first = int(np.searchsorted(ends, a, side='right'))
    last = int(np.searchsorted(ends, b, side='left'))  # the document holding token b - 1
    docs = reader.read(list(range(first, last + 1)))
    tokens = np.concatenate([np.frombuffer(d, self.dtype) for d in docs])
    offset = 0 if first == 0 else int(ends[first - 1])
    return tokens[a - offset:b - offset]

  def slice(self, a: int, b: int) -> np.ndarray:
    parts = []
    i = int(np.searchsorted(self.starts, a, side='right')) - 1
    while a < b:
      end = min(b, int(self.starts[i + 1]))
      parts.append(self._read(i, a - int(self.starts[i]), end - int(self.starts[i])))
      a, i = end, i + 1
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros((0,), np.int32)


def read_metadata(path: str, field: str) -> dict:
  """metadata.json of a prepared folder, every shard checked (sizes and CRC32); one-line
  errors naming the field, the folder and the shard."""
  fix = f're-run python -m moejax.prepare with --output={path} to finish or repair it'
  if not os.path.isdir(path):
    raise ConfigError(f'{field}={path!r}: no such folder; make one with python -m '
                      f'moejax.prepare --inputs=YOUR_TEXT --output={path}')
  meta_path = os.path.join(path, 'metadata.json')
  if not os.path.exists(meta_path):
    started = os.path.exists(os.path.join(path, 'prepare.json'))
    raise ConfigError(f'{field}={path!r}: ' + (
        f'preparation did not finish (no metadata.json); {fix}' if started else
        'holds no prepared corpus (no metadata.json); make one with python -m moejax.prepare '
        f'--inputs=YOUR_TEXT --output={path}'))
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except ValueError:
    raise ConfigError(f'{field}={path!r}: metadata.json is not valid JSON; {fix}') from None
  for split in SPLITS:
    for record in meta['splits'][split]['shards']:
      problem = shard_problem(path, record)
      if problem:
        raise ConfigError(f'{field}={path!r}: shard {problem}; {fix}')
  return meta


def open_split(path: str, meta: dict, split: str) -> ShardedTokens:
  return ShardedTokens(path, meta['splits'][split]['shards'], meta['format'], meta['dtype'])
