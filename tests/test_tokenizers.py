"""Tokenizers: round trips, special ids read from the files, and the vocabulary-size rule."""
import json

import numpy as np
import pytest

from moejax.config import ConfigError
from moejax.data import corpus, tokenizer as tokenizers

TEXT = 'def main(x):\n    return x * 2  # naïve — ünïcode ✓\n'


def _stdlib_texts(n=40):
  return [open(full, encoding='utf-8', errors='replace').read()
          for _, full in corpus.list_files('stdlib')[:n]]


@pytest.fixture(scope='module')
def bpe(tmp_path_factory):
  return tokenizers.train_bpe(_stdlib_texts(), 400, str(tmp_path_factory.mktemp('bpe')))


def test_bytes_round_trip():
  tok = tokenizers.load('bytes')
  ids = tok.encode(TEXT)
  assert len(ids) == len(TEXT.encode()) and ids.max() < 256
  assert tok.decode(ids) == TEXT
  assert tok.decode(np.append(ids, tok.eos_id)) == TEXT  # EOS is not text


def test_trained_bpe_round_trip_and_special_ids(bpe, tmp_path):
  assert bpe.vocab_size == 400
  assert (bpe.eos_id, bpe.pad_id, bpe.bos_id) == (0, 1, None)
  ids = bpe.encode(TEXT)
  assert bpe.decode(ids) == TEXT
  assert len(ids) < len(TEXT.encode())  # merges learned from Python source compress it
  np.testing.assert_array_equal(bpe.encode_batch([TEXT, 'x'])[0], ids)
  again = tokenizers.load(str(tmp_path.parent / bpe.spec.split('/')[-2]))  # the folder
  assert again.vocab_size == 400 and again.eos_id == 0
  np.testing.assert_array_equal(tokenizers.load(bpe.spec).encode(TEXT), ids)


def test_eos_from_tokenizer_config_or_refused(bpe, tmp_path):
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(bpe.spec)
  tok.save(str(tmp_path / 'tokenizer.json'))
  # No tokenizer_config.json: found by its usual name.
  assert tokenizers.load(str(tmp_path)).eos_id == 0
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(
      {'eos_token': {'content': '<|pad|>'}, 'pad_token': None}))
  assert tokenizers.load(str(tmp_path)).eos_id == 1  # the config file decides
  (tmp_path / 'tokenizer_config.json').unlink()
  tok2 = Tokenizer.from_str(tok.to_str().replace('<|endoftext|>', '<|weird|>'))
  tok2.save(str(tmp_path / 'tokenizer.json'))
  with pytest.raises(ConfigError, match='end-of-document token.*tokenizer_config.json'):
    tokenizers.load(str(tmp_path))


def test_sentencepiece_round_trip(tmp_path):
  spm = pytest.importorskip('sentencepiece', reason='SentencePiece models need the data extra')
  lines = [line for t in _stdlib_texts(10) for line in t.splitlines() if line.strip()]
  spm.SentencePieceTrainer.Train(
      sentence_iterator=iter(lines), model_prefix=str(tmp_path / 'sp'), vocab_size=400,
      model_type='bpe', pad_id=3, bos_id=-1, eos_id=2, unk_id=0, minloglevel=2,
      byte_fallback=True, normalization_rule_name='identity', remove_extra_whitespaces=False)
  tok = tokenizers.load(str(tmp_path / 'sp.model'))
  assert isinstance(tok, tokenizers.SentencePieceTokenizer)
  assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.bos_id) == (400, 2, 3, None)
  ids = tok.encode(TEXT)  # byte fallback and no normalisation: exact, newlines and all
  assert tok.decode(ids) == TEXT
  np.testing.assert_array_equal(tok.encode_batch([TEXT])[0], ids)
  tokenizers.copy_files(tok, str(tmp_path / 'run'))
  assert tokenizers.from_dir(str(tmp_path / 'run')).vocab_size == 400


def test_unreadable_or_missing_tokenizer_is_one_line(tmp_path):
  with pytest.raises(ConfigError, match='no such file'):
    tokenizers.load(str(tmp_path / 'nope.json'))
  (tmp_path / 'bad.json').write_text('{"not": "a tokenizer"}')
  with pytest.raises(ConfigError, match='bad.json: not a readable tokenizers file'):
    tokenizers.load(str(tmp_path / 'bad.json'))
  (tmp_path / 'bad.model').write_bytes(b'\x00garbage')
  try:
    import sentencepiece  # noqa: F401
    why = r'bad.model: neither a tokenizer.json \(it is not JSON\) nor a SentencePiece .model'
  except ImportError:  # without the data extra, that is said first
    why = 'bad.model: a SentencePiece model needs the sentencepiece package'
  with pytest.raises(ConfigError, match=why):
    tokenizers.load(str(tmp_path / 'bad.model'))
  with pytest.raises(ConfigError, match='holds no tokenizer.json'):
    tokenizers.load(str(tmp_path))
  # A text file (a corpus given as the tokenizer): said to be neither kind, with the choices.
  (tmp_path / 'corpus.txt').write_text('def f():\n  return 1\n')
  with pytest.raises(ConfigError, match=r'corpus.txt: neither a tokenizer.json .*; give "bytes"'):
    tokenizers.load(str(tmp_path / 'corpus.txt'))


def test_vocab_size_must_be_the_tokenizers_or_padded(bpe):
  def fail(field, value, why):
    raise ConfigError(f'{field}={value}: {why}')
  tokenizers.check_vocab(400, bpe, 1, fail)
  tokenizers.check_vocab(512, bpe, 128, fail)  # 400 padded to a multiple of 128
  with pytest.raises(ConfigError, match=r'model.vocab_size=448: .* has 400 tokens; set '
                     r'model.vocab_size=400 or 512 \(padded to data.vocab_multiple=128\)'):
    tokenizers.check_vocab(448, bpe, 128, fail)
  with pytest.raises(ConfigError, match='has 400 tokens; set model.vocab_size=400$'):
    tokenizers.check_vocab(258, bpe, 1, fail)
  tokenizers.check_vocab(300, tokenizers.ByteTokenizer(), 1, fail)  # bytes: at least 258
  with pytest.raises(ConfigError, match='at least 258'):
    tokenizers.check_vocab(257, tokenizers.ByteTokenizer(), 1, fail)
