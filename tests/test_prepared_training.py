"""Training from a prepared corpus with a trained BPE tokenizer: exact resume, bits per byte,
named evaluation sets of a mixture, and text in / text out from the run's tokenizer."""
import math
import os

import numpy as np
import pytest

from moejax.config import ConfigError
from moejax.data import corpus
from moejax.prepare import prepare
from moejax.training.loop import train
from moejax.training.metrics import read_metrics

from conftest import tiny_config


def _rows(workdir):
  return read_metrics(os.path.join(workdir, 'metrics.jsonl'))


@pytest.fixture(scope='module')
def corpora(tmp_path_factory):
  """Two corpora (stdlib files, split in halves) prepared with one BPE tokenizer of 300."""
  root = tmp_path_factory.mktemp('corpora')
  files = corpus.list_files('stdlib')[:60]
  for half, part in (('a', files[:30]), ('b', files[30:])):
    os.makedirs(root / half)
    for rel, full in part:
      (root / half / (rel.replace('/', '_') + '.txt')).write_bytes(open(full, 'rb').read()[:8000])
  quiet = dict(progress=False, log=lambda *_: None, val_percent=20)
  prepare(str(root / 'a'), str(root / 'pa'), '*.txt', vocab_size=300, **quiet)
  prepare(str(root / 'b'), str(root / 'pb'), '*.txt',
          tokenizer=str(root / 'pa' / 'tokenizer.json'), **quiet)
  return str(root / 'pa'), str(root / 'pb')


def _config(data_dir, **data):
  c = tiny_config()
  c.data.max_bytes = 0  # read only by the in-memory sources
  c.data.source, c.data.prepared_dir = 'prepared', data_dir
  c.data.vocab_multiple, c.model.vocab_size = 64, 320  # 300 padded to a multiple of 64
  for k, v in data.items():
    c.data[k] = v
  return c


@pytest.fixture(scope='module')
def full(corpora, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('full'))
  train(_config(corpora[0]), workdir)
  return workdir


@pytest.mark.slow  # two more training runs (exact resume on the stdlib corpus: test_train.py)
def test_resume_from_prepared_data_is_bit_identical(full, corpora, tmp_path):
  resumed = str(tmp_path / 'resumed')
  c = _config(corpora[0])
  c.train.stop_after = 4
  train(c, resumed)
  train(_config(corpora[0]), resumed)
  a = {r['step']: r['train/loss'] for r in _rows(full) if 'train/loss' in r}
  b = {r['step']: r['train/loss'] for r in _rows(resumed) if 'train/loss' in r}
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
  assert a == b


def test_bits_per_byte_is_the_loss_in_bits_over_bytes_per_token(full, corpora):
  import json
  meta = json.load(open(os.path.join(corpora[0], 'metadata.json')))
  bpt = meta['splits']['validation']['bytes'] / meta['splits']['validation']['tokens']
  rows = _rows(full)
  assert rows[0]['data/bytes_per_token_val'] == pytest.approx(bpt)
  last = [r for r in rows if 'eval/loss' in r][-1]
  assert last['eval/bpb'] == pytest.approx(last['eval/loss'] / math.log(2) / bpt, rel=1e-6)
  assert last['eval/perplexity'] == pytest.approx(math.exp(last['eval/loss']), rel=1e-6)


def test_generate_speaks_the_runs_tokenizer(full, capsys):
  from moejax import generate
  assert os.path.exists(os.path.join(full, 'tokenizer.json'))
  args = ['--workdir', full, '--prompt', 'def main(', '--max_new_tokens', '8', '--seed', '1']
  assert generate.main(args) == 0
  out = capsys.readouterr().out
  assert out.startswith('def main(') and len(out) > len('def main(') + 8  # BPE: > 1 byte/token


@pytest.mark.slow  # a third training run: the integration step
def test_mixture_reports_each_corpus_and_extra_sets_by_name(corpora, tmp_path):
  a, b = corpora
  c = _config('', mixture=f'{a}=3,{b}=1', eval_sets=f'other={b}')
  c.train.steps, c.train.eval_every = 3, 3
  train(c, str(tmp_path / 'run'))
  last = [r for r in _rows(str(tmp_path / 'run')) if 'eval/loss' in r][-1]
  for name in ('pa', 'pb', 'other'):
    assert {f'eval/{name}/loss', f'eval/{name}/bpb'} <= set(last)
  assert last['eval/other/loss'] == last['eval/pb/loss']  # the same validation split
  assert last['eval/loss'] == pytest.approx(0.75 * last['eval/pa/loss'] + 0.25 * last['eval/pb/loss'])
  assert last['eval/bpb'] == pytest.approx(0.75 * last['eval/pa/bpb'] + 0.25 * last['eval/pb/bpb'])


def test_bad_data_settings_are_refused_before_anything_is_written(corpora, tmp_path):
  wd = tmp_path / 'run'
  for change, match in (
      (dict(paths='/tmp'), "config.data.paths='/tmp': is not read by data.source='prepared'"),
      (dict(mixture=f'{corpora[0]}=1'), 'reads one of data.prepared_dir'),
  ):
    with pytest.raises(ConfigError, match=match):
      train(_config(corpora[0], **change), str(wd))
  c = _config(corpora[0])
  c.model.vocab_size = 300 + 1
  with pytest.raises(ConfigError, match='has 300 tokens; set model.vocab_size=300 or 320'):
    train(c, str(wd))
  assert not os.path.exists(wd / 'checkpoints')
  np.testing.assert_equal(os.path.exists(wd / 'metrics.jsonl'), False)
