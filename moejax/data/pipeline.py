"""Grain input pipeline: documents -> byte tokens -> packed fixed-length sequences -> batches.

Packing: documents (in a seed-shuffled order for training) are joined with EOS into one token
stream, cut into chunks of seq_len + 1 tokens (inputs and shifted targets). Chunks are shuffled
by seed, reshuffled each epoch, and batched into *global* batches; each JAX process keeps its own
rows of every global batch, so the data a step sees does not depend on the number of hosts.
The iterator's state is a small dict that is checkpointed with the model.
"""
from __future__ import annotations

import dataclasses

import grain
import jax
import numpy as np

from moejax.config import ConfigError
from moejax.data import corpus
from moejax.data.tokenizer import ByteTokenizer


class PackedChunks:
  """Random-access source: chunk i is tokens[i*L : i*L + L + 1]."""

  def __init__(self, tokens: np.ndarray, seq_len: int, split: str = 'train'):
    if len(tokens) < seq_len + 1:
      raise ConfigError(f'config.data.seq_len={seq_len}: the {split} split has {len(tokens)} '
                        f'tokens, fewer than one sequence of seq_len + 1; add text to '
                        'config.data.paths (or raise data.max_bytes) or lower data.seq_len')
    self.tokens, self.seq_len = tokens, seq_len

  def __len__(self):
    return (len(self.tokens) - 1) // self.seq_len

  def __getitem__(self, i):
    start = i * self.seq_len
    return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int32)


def pack(docs: list[np.ndarray], order=None) -> np.ndarray:
  eos = np.array([ByteTokenizer.eos_id], np.uint16)
  order = range(len(docs)) if order is None else order
  parts = []
  for i in order:
    parts += [docs[i].astype(np.uint16), eos]
  return np.concatenate(parts) if parts else np.zeros((0,), np.uint16)


@dataclasses.dataclass
class Splits:
  train: PackedChunks
  val: PackedChunks
  num_train_files: int
  num_val_files: int


def load_splits(data_cfg, seed: int) -> Splits:
  files = corpus.list_files(data_cfg.source, data_cfg.paths, data_cfg.file_glob)
  train_files, val_files = corpus.split_files(files, data_cfg.val_percent)
  train_docs = corpus.read_bytes(train_files)
  order = np.random.default_rng(seed).permutation(len(train_docs))
  train = pack(train_docs, order)
  if data_cfg.max_bytes:
    train = train[:data_cfg.max_bytes]
  val = pack(corpus.read_bytes(val_files))
  return Splits(PackedChunks(train, data_cfg.seq_len),
                PackedChunks(val, data_cfg.seq_len, 'validation'),
                len(train_files), len(val_files))


def _to_example(rows: np.ndarray) -> dict:
  return {'inputs': rows[:, :-1], 'targets': rows[:, 1:]}


def _local_rows(global_batch: int):
  """The rows of a global batch that this JAX process feeds."""
  n = jax.process_count()
  local = global_batch // n
  start = jax.process_index() * local
  return lambda b: {k: v[start:start + local] for k, v in b.items()}


def train_dataset(chunks: PackedChunks, batch_size: int, seed: int) -> grain.MapDataset:
  return (grain.MapDataset.source(chunks)
          .shuffle(seed=seed)
          .repeat()  # reshuffled every epoch
          .batch(batch_size, drop_remainder=True)
          .map(_to_example)
          .map(_local_rows(batch_size)))


def eval_batches(chunks: PackedChunks, batch_size: int, num_batches: int) -> list[dict]:
  """A fixed, ordered set of validation batches (the same at every evaluation)."""
  ds = (grain.MapDataset.source(chunks).repeat()
        .batch(batch_size, drop_remainder=True).map(_to_example)
        .map(_local_rows(batch_size)))
  return [ds[i] for i in range(num_batches)]


def unigram_entropy(tokens: np.ndarray) -> float:
  """Entropy (nats/token) of the token unigram distribution: the loss of a no-context model."""
  counts = np.bincount(tokens.astype(np.int64), minlength=ByteTokenizer.vocab_size)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())
