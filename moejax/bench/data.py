"""`python -m moejax.bench data --json`: is the input pipeline ever the bottleneck?

Rows, one JSON object per line:
- 'loader_<source>' for the in-memory token stream and for prepared shards in each format
  (ArrayRecord, flat .bin): global batches per second and tokens per second that the Grain
  pipeline (random access, packing, global shuffle, batching; one Python thread, no workers)
  delivers at the config's batch and sequence length, over --batches batches after a warm-up;
- 'train_step': tokens per second the config's jitted train step consumes on this machine
  (median of --reps steps after compiling);
and each loader row's 'times_train_step': how many times faster the loader is (the target is
at least 10). Without --prepared_dir the shards are made from Python's standard library with
the byte tokenizer, in a temporary folder.
"""
from __future__ import annotations

import statistics
import tempfile
import time

import jax
import numpy as np

from moejax.data import pipeline, shards
from moejax.data.shards import ArrayTokens


def _loader_rate(chunks, batch: int, seq: int, num: int) -> dict:
  it = iter(pipeline.train_dataset([chunks], batch, 0))
  for _ in range(5):
    next(it)
  t0 = time.perf_counter()
  for _ in range(num):
    next(it)
  s = time.perf_counter() - t0
  return {'batches_per_s': num / s, 'tokens_per_s': num * batch * seq / s}


def _train_rate(config, reps: int) -> float:
  from moejax.training.workdir import open_run
  trainer = open_run(config, jax.devices()[:1]).trainer
  state = trainer.init(0)
  b, seq = config.train.batch_size, config.data.seq_len
  tokens = np.random.default_rng(0).integers(0, 256, (b, seq + 1)).astype(np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}
  state, m = trainer.train_step(state, batch)  # compile
  jax.block_until_ready(m)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    state, m = trainer.train_step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  return b * seq / statistics.median(times)


def bench_data(config, prepared_dir: str, batches: int, reps: int):
  from moejax.prepare import prepare
  b, seq = config.train.batch_size, config.data.seq_len
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    dirs = {}
    if prepared_dir:
      meta = shards.read_metadata(prepared_dir, '--prepared_dir')
      dirs[meta['format']] = prepared_dir
    else:
      for fmt in shards.FORMATS:
        dirs[fmt] = f'{tmp}/{fmt}'
        prepare('stdlib', dirs[fmt], '*.py', fmt=fmt, val_percent=5, progress=False,
                log=lambda *_: None)
    sources = {}
    for fmt, d in dirs.items():
      meta = shards.read_metadata(d, '--prepared_dir')
      stream = shards.open_split(d, meta, 'train')
      sources[f'loader_{fmt}'] = stream
      if 'loader_memory' not in sources:
        sources['loader_memory'] = ArrayTokens(stream.slice(0, len(stream)), 0, 0)
    for name, stream in sources.items():
      row = {'case': name, 'batch': b, 'seq_len': seq, 'stream_tokens': len(stream)}
      row.update(_loader_rate(pipeline.PackedChunks(stream, seq), b, seq, batches))
      rows.append(row)
  step = _train_rate(config, reps)
  for row in rows:
    row['times_train_step'] = row['tokens_per_s'] / step
  rows.append({'case': 'train_step', 'batch': b, 'seq_len': seq, 'tokens_per_s': step})
  return rows
