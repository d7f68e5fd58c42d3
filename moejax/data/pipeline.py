"""Grain input pipeline: a token stream -> packed fixed-length sequences -> global batches.

One pipeline for every source. The stream is either built in memory (`data.source` 'stdlib' or
'files': documents read, shuffled by seed, tokenized, joined with EOS) or read by random access
from prepared shards (`data.source='prepared'`, moejax/data/shards.py: already EOS-joined).
Chunk i of a stream is tokens[i*L : i*L + L + 1] (inputs and shifted targets). Chunks are
shuffled by seed, reshuffled each epoch, mixed across corpora by weight (`data.mixture`), and
batched into *global* batches; each JAX process keeps its own rows of every global batch, so the
data a step sees does not depend on the number of hosts. The iterator's state is a small dict
that is checkpointed with the model.

Evaluation sets are named: '' is the training source's validation split (for a mixture, each
corpus's own set is evaluated and '' is their mean by mixture weight), plus `data.eval_sets`.
Each knows its bytes per token, so its loss converts to bits per byte.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os

import grain
import jax
import numpy as np

from moejax.errors import ConfigError
from moejax.data import corpus, shards, tokenizer as tokenizers
from moejax.data.shards import ArrayTokens


class PackedChunks:
  """Random-access source over a token stream: chunk i is tokens[i*L : i*L + L + 1]."""

  def __init__(self, stream, seq_len: int, split: str = 'train', where: str = 'data.paths'):
    if isinstance(stream, np.ndarray):
      stream = ArrayTokens(stream, len(stream), 0)
    if len(stream) < seq_len + 1:
      raise ConfigError(f'data.seq_len={seq_len}: the {split} split has {len(stream)} '
                        f'tokens, fewer than one sequence of seq_len + 1; add text to '
                        f'{where} or lower data.seq_len')
    self.stream, self.seq_len = stream, seq_len

  @property
  def tokens(self) -> np.ndarray:
    return self.stream.slice(0, len(self.stream))

  @property
  def bytes_per_token(self) -> float:
    return self.stream.num_bytes / len(self.stream)

  @property
  def num_tokens(self) -> int:
    return len(self.stream)

  def __len__(self):
    return (len(self.stream) - 1) // self.seq_len

  def __getitem__(self, i):
    start = i * self.seq_len
    return self.stream.slice(start, start + self.seq_len + 1)


def pack(docs: list[np.ndarray], order=None, eos_id: int = tokenizers.ByteTokenizer.eos_id,
         dtype=np.uint16) -> np.ndarray:
  eos = np.array([eos_id], dtype)
  order = range(len(docs)) if order is None else order
  parts = []
  for i in order:
    parts += [docs[i].astype(dtype), eos]
  return np.concatenate(parts) if parts else np.zeros((0,), dtype)


@dataclasses.dataclass
class Splits:
  train: list[PackedChunks]  # one per corpus of the mixture
  weights: list[float]
  val: dict[str, PackedChunks]  # evaluation sets by name
  val_weights: dict[str, float]  # how the sets make up the main '' metrics (mixtures)
  tokenizer: object
  num_train_docs: int
  num_val_docs: int


def _in_memory(data_cfg, seed: int, tok, validation_only: bool = False) -> Splits:
  files = corpus.list_files(data_cfg.source, data_cfg.paths, data_cfg.file_glob)
  train_files, val_files = corpus.split_files(files, data_cfg.val_percent)
  dtype = shards.token_dtype(tok.vocab_size)

  def stream(file_list, order=None, cap=0):
    raw = corpus.read_bytes(file_list)
    if isinstance(tok, tokenizers.ByteTokenizer):
      docs = raw
    else:
      docs = tok.encode_batch([r.tobytes().decode('utf-8', errors='replace') for r in raw])
    tokens = pack(docs, order, tok.eos_id, dtype)
    num_bytes = sum(len(r) + 1 for r in raw)  # + 1 for each EOS, as a newline
    if cap:
      # max_bytes caps the text; for the byte tokenizer tokens are bytes.
      keep = min(len(tokens), math.ceil(cap * len(tokens) / num_bytes))
      tokens, num_bytes = tokens[:keep], min(num_bytes, cap)
    return ArrayTokens(tokens, num_bytes, len(raw))

  order = np.random.default_rng(seed).permutation(len(train_files))
  val = stream(val_files)
  where = 'config.data.paths (or raise data.max_bytes)'
  if validation_only:  # not read: the training text
    return Splits([], [], {'': PackedChunks(val, data_cfg.seq_len, 'validation', where)},
                  {'': 1.0}, tok, len(train_files), len(val_files))
  train = stream(train_files, order, data_cfg.max_bytes)
  return Splits([PackedChunks(train, data_cfg.seq_len, where=where)], [1.0],
                {'': PackedChunks(val, data_cfg.seq_len, 'validation', where)}, {'': 1.0}, tok,
                len(train_files), len(val_files))


def parse_weighted(text: str, field: str) -> list[tuple[str, float]]:
  """'NAME_OR_DIR=WEIGHT,...' -> [(key, weight)]; a missing weight is 1."""
  out = []
  for part in (p.strip() for p in text.split(',') if p.strip()):
    key, _, w = part.rpartition('=') if '=' in part else (part, '', '1')
    try:
      weight = float(w)
    except ValueError:
      raise ConfigError(f'{field}: {part!r}: the weight {w!r} is not a number; write DIR=WEIGHT, '
                        'comma-separated') from None
    if not (math.isfinite(weight) and weight > 0):
      raise ConfigError(f'{field}: {part!r}: weights must be positive')
    out.append((key, weight))
  return out


def validation_chunks(path: str, seq_len: int, field: str) -> PackedChunks:
  """The validation split of a prepared folder, checked (errors name `field`)."""
  meta = shards.read_metadata(path, field)
  return PackedChunks(shards.open_split(path, meta, 'validation'), seq_len, 'validation', path)


def same_tokenizer(a: str, b: str) -> bool:
  """Whether two folders (prepared corpora or workdirs) carry the same tokenizer file (or
  both none: bytes)."""
  return _tokenizer_id(a) == _tokenizer_id(b)


def _tokenizer_id(path: str) -> str:
  h = hashlib.sha256()
  for name in ('tokenizer.json', 'tokenizer.model'):
    if os.path.exists(os.path.join(path, name)):
      with open(os.path.join(path, name), 'rb') as f:
        h.update(f.read())
  return h.hexdigest()


def _prepared(data_cfg) -> Splits:
  if data_cfg.mixture:
    corpora, field = parse_weighted(data_cfg.mixture, 'config.data.mixture'), 'config.data.mixture'
  else:
    corpora, field = [(data_cfg.prepared_dir, 1.0)], 'config.data.prepared_dir'
  extra = []
  for item in (s.strip() for s in data_cfg.eval_sets.split(',') if s.strip()):
    name, _, path = item.rpartition('=')
    extra.append((name or os.path.basename(os.path.normpath(path)), path))
  tok, tok_id, train, weights, val, val_weights, docs = None, None, [], [], {}, {}, [0, 0]
  seq = data_cfg.seq_len
  for path, weight in corpora:
    meta = shards.read_metadata(path, field)
    if tok is None:
      tok, tok_id = tokenizers.from_dir(path), _tokenizer_id(path)
    elif _tokenizer_id(path) != tok_id:
      raise ConfigError(f'{field}: {path} was prepared with another tokenizer than '
                        f'{corpora[0][0]}; prepare every corpus of a mixture with one tokenizer '
                        '(--tokenizer=FIRST/tokenizer.json)')
    where = f'{path} (python -m moejax.prepare)'
    train.append(PackedChunks(shards.open_split(path, meta, 'train'), seq, 'train', where))
    weights.append(weight)
    name = '' if len(corpora) == 1 else os.path.basename(os.path.normpath(path))
    if name in val:
      raise ConfigError(f'{field}: two corpora are named {name!r} (their folders\' names name '
                        'their evaluation sets); rename one folder')
    val[name] = PackedChunks(shards.open_split(path, meta, 'validation'), seq, 'validation',
                             where)
    val_weights[name] = weight
    docs[0] += meta['splits']['train']['docs']
    docs[1] += meta['splits']['validation']['docs']
  for name, path in extra:
    chunks = validation_chunks(path, seq, 'config.data.eval_sets')
    if _tokenizer_id(path) != tok_id:
      raise ConfigError(f'config.data.eval_sets: {path} was prepared with another tokenizer '
                        'than the training data; its losses would not compare')
    if name in val:
      raise ConfigError(f'config.data.eval_sets: the name {name!r} is taken; write NAME=DIR')
    val[name] = chunks
  total = sum(val_weights.values())
  return Splits(train, weights, val, {k: w / total for k, w in val_weights.items()}, tok,
                *docs)


def load_splits(data_cfg, seed: int, vocab_size: int | None = None,
                validation_only: bool = False) -> Splits:
  """The training and evaluation data of a config; every corpus and tokenizer error (and a
  model.vocab_size that does not fit the tokenizer) raised here, before anything compiles.
  validation_only: the text of the training split is not read (splits.train may be empty)."""
  if data_cfg.source == 'prepared':
    splits = _prepared(data_cfg)
  else:
    splits = _in_memory(data_cfg, seed, tokenizers.load(data_cfg.tokenizer), validation_only)
  if vocab_size is not None:
    def fail(field, value, why):
      raise ConfigError(f'config.{field}={value}: {why}')
    tokenizers.check_vocab(vocab_size, splits.tokenizer, data_cfg.vocab_multiple, fail)
  return splits


def check_batch(splits: Splits, batch_size: int, eval_batches: int) -> None:
  """A corpus too small for one batch is refused, naming the split and the fields."""
  for chunks in splits.train:
    if len(chunks) < batch_size:
      raise ConfigError(f'config.train.batch_size={batch_size}: the training split has '
                        f'{len(chunks)} sequences of data.seq_len={chunks.seq_len}, fewer than '
                        'one batch; lower train.batch_size or data.seq_len, or add text')
  for name, chunks in splits.val.items():
    if len(chunks) < batch_size:
      raise ConfigError(f'config.train.batch_size={batch_size}: the validation set '
                        f'{name or "(main)"} has {len(chunks)} sequences, fewer than one batch; '
                        'lower train.batch_size or data.seq_len, or give more validation text')


def _to_example(rows) -> dict:
  if isinstance(rows, dict):  # a routing trace's sequences and their routes (data.replay)
    return {'inputs': rows['tokens'][:, :-1], 'targets': rows['tokens'][:, 1:],
            'replay': rows['routes'][:, :-1]}
  return {'inputs': rows[:, :-1], 'targets': rows[:, 1:]}


def local_rows(global_batch: int, index: int | None = None, count: int | None = None):
  """The rows of a global batch that JAX process `index` of `count` feeds (this one's)."""
  n = jax.process_count() if count is None else count
  i = jax.process_index() if index is None else index
  local = global_batch // n
  start = i * local
  return lambda b: {k: v[start:start + local] for k, v in b.items()}


def train_dataset(chunks, batch_size: int, seed: int, weights=None,
                  process: tuple[int, int] | None = None) -> grain.MapDataset:
  """Shuffled (reshuffled every epoch), mixed by weight when several corpora, batched."""
  sources = chunks if isinstance(chunks, (list, tuple)) else [chunks]
  streams = [grain.MapDataset.source(c).shuffle(seed=seed + 7919 * i).repeat()
             for i, c in enumerate(sources)]
  ds = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, weights)
  return (ds.batch(batch_size, drop_remainder=True)
          .map(_to_example)
          .map(local_rows(batch_size, *(process or (None, None)))))


# The evaluation sample's seed: fixed, so every run, arm and evaluation sees the same chunks
# (paired comparisons), whatever the run's seed.
EVAL_SEED = 20261202


@dataclasses.dataclass
class EvalSet:
  """The batches an evaluation runs over, and what they cover."""
  batches: list[dict]
  bytes_per_token: float
  tokens: int  # target tokens evaluated
  sequences: int
  split_tokens: int  # the whole split's
  split_docs: int

  def label(self) -> str:
    share = 'the whole split' if self.tokens >= self.split_tokens - self.sequences else (
        f'{100 * self.tokens / max(self.split_tokens, 1):.1f}% of the split')
    return (f'{self.tokens:,} tokens in {self.sequences:,} sequences ({share}: '
            f'{self.split_tokens:,} tokens, {self.split_docs:,} documents)')


def eval_sample(num_chunks: int, count: int) -> np.ndarray:
  """`count` chunk indices drawn without replacement, uniformly over the whole split (every
  document can contribute), in order; a fixed seed, so the sample is the same in every run,
  and a smaller sample is the start of a larger one."""
  return np.sort(np.random.default_rng(EVAL_SEED).permutation(num_chunks)[:count])


def eval_batches(chunks: PackedChunks, batch_size: int, num_batches: int) -> list[dict]:
  """`num_batches` validation batches of chunks sampled across the whole split (eval_sample),
  the same at every evaluation; 0, or more batches than the split holds: every whole batch of
  the split, in order."""
  whole = len(chunks) // batch_size
  if num_batches == 0 or num_batches >= whole:
    index = np.arange(whole * batch_size)
  else:
    index = eval_sample(len(chunks), num_batches * batch_size)
  rows = local_rows(batch_size)
  return [rows(_to_example(np.stack([chunks[int(i)] for i in index[b:b + batch_size]])))
          for b in range(0, len(index), batch_size)]


def eval_set(chunks: PackedChunks, batch_size: int, num_batches: int) -> EvalSet:
  """eval_batches with what they cover."""
  batches = eval_batches(chunks, batch_size, num_batches)
  sequences = len(batches) * batch_size
  return EvalSet(batches, chunks.bytes_per_token, sequences * chunks.seq_len, sequences,
                 len(chunks.stream), chunks.stream.num_docs)


def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float:
  """Loss in bits per token over bytes per token."""
  return loss_nats / math.log(2) / bytes_per_token


def unigram_entropy(tokens: np.ndarray) -> float:
  """Entropy (nats/token) of the token unigram distribution: the loss of a no-context model."""
  counts = np.bincount(tokens.astype(np.int64))
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())
