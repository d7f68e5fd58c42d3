"""Prepare a corpus: documents -> (optionally train a BPE tokenizer) -> token shards.

`prepare(inputs, output, ...)` streams the documents (moejax/data/documents.py) in batches of
at most `batch_mb` of text, splits them into train and validation by a hash of each document's
name, tokenizes each batch in parallel (the tokenizer libraries' own threads) and writes shards
of `shard_tokens` tokens (moejax/data/shards.py).

Memory stays bounded whatever the corpus size: one batch of text (batch_mb, or the largest
single document if larger) and its tokens, plus per split at most shard_tokens + one document of
tokens waiting to be written. Tokenizer training keeps the tokenizer library's word counts.

Interrupted runs are finished by re-running the same command: each shard becomes visible only
once complete (written under a temporary name, renamed, then recorded), a re-run keeps every
intact shard, skips the documents they hold and writes the rest; shards that are truncated or
do not match their record are written again. The settings are kept in prepare.json; a re-run
with different ones is refused rather than mixing two corpora in one folder.
"""
from __future__ import annotations

import collections
import json
import os
import sys
import time

from moejax.errors import ConfigError
from moejax.data import corpus, documents, shards, tokenizer as tokenizers


def _settings(inputs, file_glob, text_field, tokenizer, vocab_size, fmt, val_percent,
              shard_tokens) -> dict:
  return {'inputs': inputs, 'file_glob': file_glob, 'text_field': text_field,
          'tokenizer': tokenizer, 'vocab_size': vocab_size, 'format': fmt,
          'val_percent': val_percent, 'shard_tokens': shard_tokens}


def _check(s: dict, output: str) -> None:
  if s['format'] not in shards.FORMATS:
    raise ConfigError(f"--format={s['format']}: must be one of {', '.join(shards.FORMATS)}")
  if not 0 < s['val_percent'] < 100:
    raise ConfigError(f"--val_percent={s['val_percent']}: must be between 0 and 100")
  if s['shard_tokens'] < 1:
    raise ConfigError(f"--shard_tokens={s['shard_tokens']}: must be at least 1")
  if s['vocab_size'] and s['tokenizer'] != 'bytes':
    raise ConfigError('--vocab_size trains a new tokenizer and --tokenizer gives one; use one')
  if s['vocab_size'] and s['vocab_size'] < 260:
    raise ConfigError(f"--vocab_size={s['vocab_size']}: a byte-level BPE needs at least 260 "
                      '(256 bytes, EOS, PAD and one merge)')
  if os.path.exists(output) and not os.path.isdir(output):
    raise ConfigError(f'--output={output} is a file; give a folder (new, or this corpus\'s)')


def _resume_settings(output: str, s: dict) -> None:
  path = os.path.join(output, 'prepare.json')
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    changed = [k for k in s if old.get(k) != s[k]]
    if changed:
      k = changed[0]
      finished = os.path.exists(os.path.join(output, 'metadata.json'))
      what = ('holds a corpus prepared' if finished else
              'holds an unfinished run (safe to delete: it holds only that run\'s files) made')
      raise ConfigError(f'--output={output} {what} with --{k}={old.get(k)!r}, not {s[k]!r}; '
                        're-run with the same settings to ' + ('use' if finished else 'finish') +
                        ' it, or give a new --output')
  elif os.path.isdir(output) and os.listdir(output):
    raise ConfigError(f'--output={output} is not empty and holds no prepared corpus; give a '
                      'new or empty folder (nothing in it is touched)')
  os.makedirs(output, exist_ok=True)
  shards._write_json(path, s)


def _batches(docs, batch_bytes: int):
  """Lists of (index, name, text) holding at most batch_bytes of text (or one document)."""
  batch, size, index = [], 0, 0
  for name, text, read in docs:
    yield None, read  # progress
    if text is None:
      continue
    batch.append((index, name, text))
    index += 1
    size += len(text)
    if size >= batch_bytes:
      yield batch, 0
      batch, size = [], 0
  if batch:
    yield batch, 0


class Split:
  """Which split each document goes to, decided before anything is written: a hash of its name
  (--val_percent of them to validation), except that a corpus where no name hashes into one of
  the splits gives it the document closest to the threshold, so both splits have one."""

  def __init__(self, files, text_field: str, val_percent: float):
    self.val_percent = val_percent
    self.to_val = self.to_train = None
    cut = val_percent * 100
    best_val, best_train, found_val, found_train, count = None, None, False, False, 0
    for name, text, _ in documents.read(files, text_field, documents.Skipped()):
      if text is None:
        continue
      count += 1
      score = corpus.split_score(name)
      found_val |= score < cut
      found_train |= score >= cut
      if found_val and found_train:  # the hash alone gives both splits (a large corpus: soon)
        return
      if best_val is None or score < best_val[0]:
        best_val = (score, name)
      if best_train is None or score > best_train[0]:
        best_train = (score, name)
    if count < 2:
      raise ConfigError(f'--inputs: {count} document(s); a train and a validation split need at '
                        'least two documents (add files, or split the text into several)')
    if not found_val:
      self.to_val = best_val[1]
    if not found_train:
      self.to_train = best_train[1]

  def is_validation(self, name: str) -> bool:
    if name == self.to_val:
      return True
    if name == self.to_train:
      return False
    return corpus.is_validation(name, self.val_percent)

  def note(self) -> str:
    """A line saying which document was moved, or ''."""
    moved = [(n, s) for n, s in ((self.to_val, 'validation'), (self.to_train, 'train')) if n]
    return '; '.join(f'note: no document name hashes into the {split} split at --val_percent='
                     f'{self.val_percent:g}, so {name} (the closest) is in it' for name, split in
                     moved)


def _train_texts(files, s, skipped, split: Split):
  for name, text, _ in documents.read(files, s['text_field'], skipped):
    if text is not None and not split.is_validation(name):
      yield text


def prepare(inputs: str, output: str, file_glob: str = '*.txt,*.md,*.py,*.jsonl,*.parquet',
            text_field: str = 'text', tokenizer: str = 'bytes', vocab_size: int = 0,
            fmt: str = 'array_record', val_percent: float = 1.0,
            shard_tokens: int = 1 << 24, batch_mb: float = 16, progress: bool = True,
            stop_after_shards: int = 0, log=print) -> dict:
  """Prepare output from inputs; returns the metadata (also in output/metadata.json)."""
  s = _settings(inputs, file_glob, text_field, tokenizer, vocab_size, fmt, val_percent,
                shard_tokens)
  _check(s, output)
  left_out = collections.Counter()
  files = documents.find_files(inputs, file_glob, left_out)  # before anything is written
  if documents.left_out_note(left_out, file_glob):
    log(documents.left_out_note(left_out, file_glob))
  tok = None if vocab_size else tokenizers.load(tokenizer)
  split_of = Split(files, text_field, val_percent)  # also before: both splits get documents
  if split_of.note():
    log(split_of.note())
  _resume_settings(output, s)
  t0 = time.perf_counter()
  skipped = documents.Skipped()
  if vocab_size:
    tok = (tokenizers.from_dir(output) if os.path.exists(os.path.join(output, 'tokenizer.json'))
           else tokenizers.train_bpe(_train_texts(files, s, skipped, split_of), vocab_size,
                                     output))
    skipped = documents.Skipped()  # the tokenizing pass below counts them again
  else:
    tokenizers.copy_files(tok, output)
    tok = tokenizers.from_dir(output)  # the copy in the folder is the one the metadata names
  dtype = shards.token_dtype(tok.vocab_size)
  done = {split: shards.complete_shards(output, split) for split in shards.SPLITS}
  after = {split: (recs[-1]['last_doc'] if recs else -1) for split, recs in done.items()}
  _remove_after(output, done)
  writers = {split: shards.ShardWriter(output, split, fmt, dtype, shard_tokens, len(done[split]))
             for split in shards.SPLITS}
  total = sum(os.path.getsize(p) for _, p in files)
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=total, unit='B', unit_scale=True, desc='prepare', dynamic_ncols=True)
  new_bytes = new_tokens = 0
  try:
    for batch, read in _batches(documents.read(files, text_field, skipped),
                                int(batch_mb * 2**20)):
      if bar is not None and read:
        bar.update(read)
      if not batch:
        continue
      todo = []
      for index, name, text in batch:
        split = 'validation' if split_of.is_validation(name) else 'train'
        if index > after[split]:
          todo.append((index, split, text))
      encoded = tok.encode_batch([text for _, _, text in todo])
      for (index, split, text), ids in zip(todo, encoded):
        nbytes = len(text.encode('utf-8')) + 1  # + 1 for the EOS, as a newline
        writers[split].add(_with_eos(ids, tok.eos_id), nbytes, index)
        new_bytes += nbytes
        new_tokens += len(ids) + 1
      if stop_after_shards and sum(w.written for w in writers.values()) >= stop_after_shards:
        raise KeyboardInterrupt  # as if interrupted: the test of resuming
    for w in writers.values():
      w.flush()
  finally:
    if bar is not None:
      bar.close()
  for line in skipped.lines():
    print(line, file=sys.stderr)
  seconds = time.perf_counter() - t0
  meta = _finish(output, tok, fmt, dtype, s)
  meta['report'] = {'seconds': seconds, 'new_text_mb': new_bytes / 1e6,
                    'mb_per_s': new_bytes / 1e6 / seconds,
                    'tokens_per_s': new_tokens / seconds,
                    'peak_buffered_tokens': max(w.peak_buffered for w in writers.values())}
  log(report_line(output, meta))
  return meta


def _with_eos(ids, eos_id: int):
  import numpy as np
  return np.concatenate([ids, np.array([eos_id], np.int32)])


def _remove_after(output: str, done: dict) -> None:
  """Remove the files of every shard past each split's intact prefix (half-written, truncated
  or corrupt, and any after them), and metadata.json if one of them was listed there."""
  stale = [f for f in os.listdir(output) for split in shards.SPLITS
           if f.startswith(split + '-') and f[len(split) + 1:len(split) + 6].isdigit()
           and int(f[len(split) + 1:len(split) + 6]) >= len(done[split])]
  for f in stale:
    os.remove(os.path.join(output, f))
  if stale and os.path.exists(os.path.join(output, 'metadata.json')):
    os.remove(os.path.join(output, 'metadata.json'))


def _finish(output: str, tok, fmt: str, dtype, s: dict) -> dict:
  splits = {}
  for split in shards.SPLITS:
    recs = shards.complete_shards(output, split)
    splits[split] = {'docs': sum(r['docs'] for r in recs),
                     'tokens': sum(r['tokens'] for r in recs),
                     'bytes': sum(r['bytes'] for r in recs), 'shards': recs}
    sp = splits[split]
    sp['bytes_per_token'] = sp['bytes'] / sp['tokens'] if sp['tokens'] else 0.0
  meta = {'version': 1, 'format': fmt, 'dtype': dtype.__name__,
          'tokenizer': {'spec': tok.spec, 'vocab_size': tok.vocab_size, 'eos_id': tok.eos_id,
                        'pad_id': tok.pad_id, 'bos_id': tok.bos_id},
          'settings': s, 'splits': splits}
  if splits['train']['docs'] and splits['validation']['docs']:
    shards._write_json(os.path.join(output, 'metadata.json'), meta)
  return meta


def report_line(output: str, meta: dict) -> str:
  tr, va, r = meta['splits']['train'], meta['splits']['validation'], meta['report']
  return (f"prepared {output}: train {tr['docs']} docs, {tr['tokens']} tokens, "
          f"{tr['bytes'] / 1e6:.1f} MB ({tr['bytes_per_token']:.2f} bytes/token); validation "
          f"{va['docs']} docs, {va['tokens']} tokens; vocabulary {meta['tokenizer']['vocab_size']};"
          f" this run {r['new_text_mb']:.1f} MB in {r['seconds']:.1f} s: {r['mb_per_s']:.2f} MB/s, "
          f"{r['tokens_per_s']:,.0f} tokens/s")
