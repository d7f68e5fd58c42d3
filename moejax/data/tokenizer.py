"""Tokenizers: bytes (the default), a Hugging Face `tokenizers` file, or a SentencePiece model.

Every tokenizer has `vocab_size`, `eos_id`, `pad_id`, `bos_id` (None when it has none),
`encode(text) -> int32 ids`, `encode_batch(texts)` (parallel in the Rust/C++ libraries) and
`decode(ids) -> str`. `load(spec)` takes 'bytes', a `tokenizer.json`, a folder holding one, or
a SentencePiece `.model` file. `train_bpe` trains a byte-level BPE tokenizer on the user's own
text (nothing downloaded) and saves it as `tokenizer.json` + `tokenizer_config.json`.

The vocabulary size a model needs is the tokenizer's, optionally padded up to a multiple (e.g.
128: accelerator matmuls prefer it); `check_vocab` refuses anything else.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from moejax.errors import ConfigError

# Special tokens a tokenizer.json without a tokenizer_config.json may name its EOS with.
EOS_NAMES = ('<|endoftext|>', '</s>', '<eos>', '<|end_of_text|>', '<|eos|>', '<|end|>')
PAD_NAMES = ('<|pad|>', '<pad>', '[PAD]')
BOS_NAMES = ('<s>', '<bos>', '<|begin_of_text|>', '<|startoftext|>')


class ByteTokenizer:
  """Ids 0-255 are bytes, then EOS (document end) and PAD."""
  eos_id = 256
  pad_id = 257
  bos_id = None
  vocab_size = 258
  spec = 'bytes'
  files: tuple[str, ...] = ()

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode('utf-8') if isinstance(text, str) else text
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def encode_batch(self, texts) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
    return data.decode('utf-8', errors='replace')


class HFTokenizer:
  """A Hugging Face `tokenizers` file; special ids from tokenizer_config.json beside it, else
  from the usual names of its added special tokens."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer
    self.spec = path
    try:
      self.tok = Tokenizer.from_file(path)
    except Exception as e:  # the Rust error names what it could not parse
      raise ConfigError(f'tokenizer {path}: not a readable tokenizers file ({e})') from None
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
    names = self._config_names(os.path.join(os.path.dirname(path), 'tokenizer_config.json'))
    self.eos_id = self._find(names.get('eos_token'), EOS_NAMES)
    if self.eos_id is None:
      raise ConfigError(f'tokenizer {path}: cannot tell its end-of-document token (none of '
                        f'{", ".join(EOS_NAMES)}); put a tokenizer_config.json with '
                        '"eos_token" beside it')
    pad = self._find(names.get('pad_token'), PAD_NAMES)
    self.pad_id = self.eos_id if pad is None else pad
    self.bos_id = self._find(names.get('bos_token'), BOS_NAMES)
    self.files = tuple(p for p in (path, os.path.join(os.path.dirname(path),
                                                      'tokenizer_config.json'))
                       if os.path.exists(p))

  @staticmethod
  def _config_names(path: str) -> dict:
    if not os.path.exists(path):
      return {}
    with open(path) as f:
      cfg = json.load(f)
    # Either a plain string or an AddedToken dict {"content": ...}.
    return {k: (v['content'] if isinstance(v, dict) else v) for k, v in cfg.items()
            if k in ('eos_token', 'pad_token', 'bos_token') and v}

  def _find(self, name, fallbacks):
    for n in ([name] if name else list(fallbacks)):
      i = self.tok.token_to_id(n)
      if i is not None:
        return i
    return None

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts) -> list[np.ndarray]:
    return [np.asarray(e.ids, np.int32)
            for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


class SentencePieceTokenizer:
  def __init__(self, path: str):
    try:
      import sentencepiece as spm
    except ImportError:
      if not path.endswith('.model'):  # a file of another kind (a corpus, a vocabulary list)
        raise ConfigError(f'tokenizer {path}: neither a tokenizer.json (it is not JSON) nor a '
                          'SentencePiece .model; give "bytes", a tokenizer.json, a folder '
                          'holding one, or a SentencePiece .model file') from None
      raise ConfigError(f'tokenizer {path}: a SentencePiece model needs the sentencepiece '
                        "package: pip install 'moejax[data]'") from None
    self.spec, self.files = path, (path,)
    self.sp = spm.SentencePieceProcessor()
    try:
      self.sp.Load(path)
    except Exception as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ConfigError(f'tokenizer {path}: neither a tokenizer.json (it is not JSON) nor a '
                        f'SentencePiece .model ({first}); give "bytes", a tokenizer.json, a '
                        'folder holding one, or a SentencePiece .model file') from None
    self.vocab_size = self.sp.GetPieceSize()
    self.eos_id = self.sp.eos_id()
    if self.eos_id < 0:
      raise ConfigError(f'tokenizer {path}: the SentencePiece model has no EOS piece '
                        '(train it with eos_id >= 0)')
    self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
    self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.sp.EncodeAsIds(text), np.int32)

  def encode_batch(self, texts) -> list[np.ndarray]:
    return [np.asarray(ids, np.int32) for ids in self.sp.EncodeAsIds(list(texts))]

  def decode(self, ids) -> str:
    return self.sp.DecodeIds([int(i) for i in ids if int(i) != self.eos_id])


def load(spec: str):
  """'bytes', a tokenizer.json (or a folder with one) or a SentencePiece .model file."""
  if spec in ('', 'bytes'):
    return ByteTokenizer()
  if os.path.isdir(spec):
    for name in ('tokenizer.json', 'tokenizer.model'):
      if os.path.exists(os.path.join(spec, name)):
        return load(os.path.join(spec, name))
    raise ConfigError(f'tokenizer {spec}: the folder holds no tokenizer.json or tokenizer.model')
  if not os.path.isfile(spec):
    raise ConfigError(f'tokenizer {spec}: no such file; give "bytes", a tokenizer.json, a '
                      'folder holding one, or a SentencePiece .model file')
  with open(spec, 'rb') as f:
    head = f.read(1).lstrip()
  return HFTokenizer(spec) if head == b'{' else SentencePieceTokenizer(spec)


def padded_vocab(size: int, multiple: int) -> int:
  return -(-size // multiple) * multiple


def check_vocab(vocab_size: int, tok, multiple: int, fail) -> None:
  """model.vocab_size must be the tokenizer's size or that size padded to data.vocab_multiple."""
  if isinstance(tok, ByteTokenizer):
    if vocab_size < tok.vocab_size:
      fail('model.vocab_size', vocab_size, 'the byte tokenizer needs at least 258 (256 bytes, '
           'EOS, PAD)')
    return
  allowed = {tok.vocab_size, padded_vocab(tok.vocab_size, multiple)}
  if vocab_size not in allowed:
    padded = (f' or {padded_vocab(tok.vocab_size, multiple)} (padded to data.vocab_multiple='
              f'{multiple})' if multiple > 1 else '')
    fail('model.vocab_size', vocab_size, f'the tokenizer {tok.spec} has {tok.vocab_size} '
         f'tokens; set model.vocab_size={tok.vocab_size}{padded}')


def train_bpe(texts, vocab_size: int, out_dir: str, min_frequency: int = 2) -> HFTokenizer:
  """A byte-level BPE tokenizer trained on texts (an iterable of str), saved in out_dir as
  tokenizer.json with <|endoftext|> (EOS) and <|pad|> as its first ids."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
      special_tokens=['<|endoftext|>', '<|pad|>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, 'tokenizer.json')
  tok.save(path + '.tmp')
  with open(os.path.join(out_dir, 'tokenizer_config.json'), 'w') as f:
    json.dump({'eos_token': '<|endoftext|>', 'pad_token': '<|pad|>'}, f)
  os.replace(path + '.tmp', path)
  return HFTokenizer(path)


def copy_files(tok, out_dir: str) -> None:
  """Copy a tokenizer's files into out_dir (a workdir or a prepared folder)."""
  os.makedirs(out_dir, exist_ok=True)
  for src in tok.files:
    name = os.path.basename(src)
    if name != 'tokenizer_config.json':
      name = 'tokenizer.json' if isinstance(tok, HFTokenizer) else 'tokenizer.model'
    dst = os.path.join(out_dir, name)
    if os.path.abspath(src) != os.path.abspath(dst):
      shutil.copyfile(src, dst + '.tmp')
      os.replace(dst + '.tmp', dst)


def from_dir(path: str):
  """The tokenizer saved in a workdir or prepared folder; bytes when there is none."""
  for name in ('tokenizer.json', 'tokenizer.model'):
    if os.path.exists(os.path.join(path, name)):
      return load(os.path.join(path, name))
  return ByteTokenizer()


# A workdir imported from Hugging Face (moejax/hf) carries its source config under this name.
IMPORTED_MARK = 'hf_config.json'
_NO_TOKENIZER = ("its ids are not bytes. Copy the model's tokenizer.json (or tokenizer.model) "
                 'into the workdir, or import it again with --tokenizer=PATH')


def for_run(workdir: str):
  """The tokenizer a run samples with: the one saved in its workdir; bytes when there is none,
  except for a model imported from Hugging Face without one, which is refused."""
  tok = from_dir(workdir)
  if isinstance(tok, ByteTokenizer) and os.path.exists(os.path.join(workdir, IMPORTED_MARK)):
    raise ConfigError(f'--workdir={workdir}: imported from Hugging Face without a tokenizer; '
                      + _NO_TOKENIZER)
  return tok


def check_training(data_cfg, workdir: str) -> None:
  """Fine-tuning an imported model on text tokenized as bytes is refused: not its tokens."""
  if (data_cfg.source != 'prepared' and data_cfg.tokenizer == 'bytes' and
      os.path.exists(os.path.join(workdir, IMPORTED_MARK))):
    raise ConfigError(f'config.data.tokenizer=\'bytes\': {workdir} holds a model imported from '
                      'Hugging Face, whose tokens are not bytes; set --config.data.tokenizer to '
                      'its tokenizer (a tokenizer.json, its folder or a .model), or train on a '
                      'corpus prepared with it (data.source=prepared)')
