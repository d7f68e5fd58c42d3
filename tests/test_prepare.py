"""python -m moejax.prepare: inputs, shards read back, bounded memory, resuming, bad input; and
the pipeline over prepared data (packing, mixtures, per-process rows, bits per byte)."""
import json
import math
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from moejax.config import ConfigError, base_config
from moejax.data import corpus, pipeline, shards, tokenizer as tokenizers
from moejax.prepare import prepare


def _corpus(root, n=30, size=3000):
  """Text files from the standard library under root/text, plus a hidden folder and a virtual
  environment whose files must be skipped."""
  texts = [open(full, encoding='utf-8', errors='replace').read()[:size]
           for _, full in corpus.list_files('stdlib')[:n]]
  os.makedirs(root / 'text' / 'sub')
  for i, t in enumerate(texts):
    (root / 'text' / ('sub' if i % 2 else '') / f'f{i:03d}.txt').write_text(t)
  for hidden in ('.git', 'venv_x'):
    os.makedirs(root / 'text' / hidden)
    (root / 'text' / hidden / 'skip.txt').write_text('SKIPPED ' * 100)
  (root / 'text' / 'venv_x' / 'pyvenv.cfg').write_text('home = /usr')
  return str(root / 'text')


def _reference(path, tok, val_percent):
  """Every document's tokens + EOS, per split, in input order: what the shards must hold."""
  ref = {'train': [], 'validation': []}
  from moejax.data import documents
  for name, text, _ in documents.read(documents.find_files(path, '*.txt'), 'text',
                                      documents.Skipped()):
    if text is None:
      continue
    split = 'validation' if corpus.is_validation(name, val_percent) else 'train'
    ref[split] += [tok.encode(text), [tok.eos_id]]
  return {k: np.concatenate(v).astype(np.int32) for k, v in ref.items()}


def _quiet(**kw):
  return dict(progress=False, log=lambda *_: None, **kw)


@pytest.mark.parametrize('fmt', shards.FORMATS)
def test_shards_read_back_equal_the_in_memory_reference(tmp_path, fmt):
  src = _corpus(tmp_path)
  out = str(tmp_path / 'out')
  meta = prepare(src, out, '*.txt', fmt=fmt, val_percent=20, shard_tokens=5000, **_quiet())
  ref = _reference(src, tokenizers.ByteTokenizer(), 20)
  assert len(meta['splits']['train']['shards']) > 3  # several shards, so reads cross them
  for split in shards.SPLITS:
    stream = shards.open_split(out, shards.read_metadata(out, 'f'), split)
    assert len(stream) == len(ref[split]) == meta['splits'][split]['tokens']
    np.testing.assert_array_equal(stream.slice(0, len(stream)), ref[split])
    rng = np.random.default_rng(0)
    for a in rng.integers(0, len(stream) - 300, 50):  # random windows, across shards and docs
      np.testing.assert_array_equal(stream.slice(a, a + 257), ref[split][a:a + 257])
  text = b''.join(open(os.path.join(dp, f), 'rb').read() for dp, _, fs in os.walk(src)
                  for f in fs if f.startswith('f'))
  docs = meta['splits']['train']['docs'] + meta['splits']['validation']['docs']
  assert docs == 30  # the hidden folder and the virtual environment were skipped
  assert meta['splits']['train']['bytes'] + meta['splits']['validation']['bytes'] == \
      len(text) + docs  # each document's bytes + 1 for its EOS
  assert meta['splits']['train']['bytes_per_token'] == 1.0  # bytes: tokens are bytes


def test_memory_stays_bounded_whatever_the_corpus_size(tmp_path):
  """JSONL corpora of 0.9 and 3.8 MB through 16 KB text batches and 65536-token shards: the writer
  never holds more than a shard plus one document, and the peak of Python's allocations does
  not grow with the corpus (and stays far below it)."""
  line = json.dumps({'text': 'x = [i * 2 for i in range(10)]  # a document\n' * 10}) + '\n'
  peaks = []
  for n in (2000, 8000):
    src = tmp_path / f'c{n}.jsonl'
    src.write_text(line * n)
    prepare(str(src), str(tmp_path / f'warm{n}'), val_percent=5, shard_tokens=1 << 16,
            batch_mb=1 / 64, **_quiet())  # imports and caches, outside the measurement
    tracemalloc.start()
    meta = prepare(str(src), str(tmp_path / f'o{n}'), val_percent=5, shard_tokens=1 << 16,
                   batch_mb=1 / 64, **_quiet())
    peaks.append(tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
    assert meta['report']['peak_buffered_tokens'] <= (1 << 16) + len(line)
  size = os.path.getsize(tmp_path / 'c8000.jsonl')
  assert size > 3_000_000
  assert peaks[1] < 1.25 * peaks[0] and peaks[1] < size / 5, (peaks, size)


def test_interrupted_run_finishes_and_equals_an_uninterrupted_one(tmp_path):
  src = _corpus(tmp_path)
  full, cut = str(tmp_path / 'full'), str(tmp_path / 'cut')
  kw = dict(file_glob='*.txt', fmt='bin', val_percent=20, shard_tokens=5000)
  prepare(src, full, **kw, **_quiet())
  with pytest.raises(KeyboardInterrupt):
    prepare(src, cut, **kw, **_quiet(stop_after_shards=4))
  assert not os.path.exists(os.path.join(cut, 'metadata.json'))
  with pytest.raises(ConfigError, match='preparation did not finish'):
    shards.read_metadata(cut, 'config.data.prepared_dir')
  # A kill mid-write leaves a temporary file and (worse) a truncated last shard.
  done = shards.complete_shards(cut, 'train')
  assert len(done) >= 2
  last = os.path.join(cut, done[-1]['file'])
  with open(last, 'r+b') as f:
    f.truncate(100)
  open(os.path.join(cut, f'train-{len(done):05d}.bin.tmp'), 'wb').write(b'half')
  meta = prepare(src, cut, **kw, **_quiet())
  assert meta['report']['new_text_mb'] < 0.9 * (meta['splits']['train']['bytes'] +
                                                meta['splits']['validation']['bytes']) / 1e6
  names = sorted(f for f in os.listdir(full) if f != 'prepare.json')
  assert sorted(f for f in os.listdir(cut) if f != 'prepare.json') == names
  for f in names:
    if f != 'metadata.json':
      assert open(os.path.join(full, f), 'rb').read() == open(os.path.join(cut, f), 'rb').read(), f
  a, b = (json.load(open(os.path.join(d, 'metadata.json'))) for d in (full, cut))
  assert a['splits'] == b['splits']


def test_rerun_with_other_settings_or_into_a_foreign_folder_is_refused(tmp_path):
  src = _corpus(tmp_path)
  out = str(tmp_path / 'out')
  prepare(src, out, '*.txt', val_percent=20, **_quiet())
  before = {f: open(os.path.join(out, f), 'rb').read() for f in os.listdir(out)}
  with pytest.raises(ConfigError, match='prepared with --val_percent=20'):
    prepare(src, out, '*.txt', val_percent=10, **_quiet())
  assert {f: open(os.path.join(out, f), 'rb').read() for f in os.listdir(out)} == before
  with pytest.raises(ConfigError, match='not empty and holds no prepared corpus'):
    prepare(src, src, '*.txt', **_quiet())
  with pytest.raises(ConfigError, match=r"--file_glob='\*.nothing': matches no file"):
    prepare(src, str(tmp_path / 'o2'), '*.nothing', **_quiet())
  assert not os.path.exists(tmp_path / 'o2')


def test_jsonl_and_parquet_inputs_and_lines_without_text(tmp_path, capsys):
  pa = pytest.importorskip('pyarrow', reason='Parquet inputs need the data extra (pyarrow)')
  import pyarrow.parquet as pq
  rows = [{'text': f'document number {i} ' * 20} for i in range(40)]
  with open(tmp_path / 'a.jsonl', 'w') as f:
    for r in rows[:20]:
      f.write(json.dumps(r) + '\n')
    f.write(json.dumps({'body': 'no text field'}) + '\n')
    f.write('{not json\n')
    f.write(json.dumps({'body': 'again'}) + '\n')
  pq.write_table(pa.table({'text': [r['text'] for r in rows[20:]]}), tmp_path / 'b.parquet')
  out = str(tmp_path / 'out')
  meta = prepare(f'{tmp_path}/a.jsonl,{tmp_path}/b.parquet', out, val_percent=20, **_quiet())
  assert meta['splits']['train']['docs'] + meta['splits']['validation']['docs'] == 40
  err = capsys.readouterr().err
  assert "a.jsonl: 2 line(s) skipped: no text field 'text' (set --text_field)" in err
  assert 'a.jsonl: 1 line(s) skipped: not valid JSON' in err
  stream = shards.open_split(out, shards.read_metadata(out, 'f'), 'train')
  text = tokenizers.ByteTokenizer().decode(stream.slice(0, len(stream)))
  assert 'document number 3 ' in text and 'document number 33 ' in text
  with pytest.raises(ConfigError, match="b.parquet: no column 'body' \\(it has text\\)"):
    prepare(f'{tmp_path}/b.parquet', str(tmp_path / 'o2'), text_field='body', **_quiet())


def test_trained_tokenizer_and_bits_per_byte_by_hand(tmp_path):
  src = _corpus(tmp_path)
  out = str(tmp_path / 'out')
  meta = prepare(src, out, '*.txt', vocab_size=300, val_percent=20, **_quiet())
  tok = tokenizers.from_dir(out)
  assert tok.vocab_size == 300 and meta['tokenizer']['eos_id'] == tok.eos_id
  ref = _reference(src, tok, 20)
  val = shards.open_split(out, shards.read_metadata(out, 'f'), 'validation')
  np.testing.assert_array_equal(val.slice(0, len(val)), ref['validation'])
  # Bytes per token: the validation text's bytes (+1 per document) over its tokens.
  bpt = meta['splits']['validation']['bytes'] / meta['splits']['validation']['tokens']
  assert bpt > 1.2  # even 300 tokens compress Python source
  c = base_config().data
  c.source, c.prepared_dir, c.seq_len = 'prepared', out, 16
  splits = pipeline.load_splits(c, 0, vocab_size=300)
  assert splits.val[''].bytes_per_token == bpt
  # 2 nats per token at 4 bytes per token = 2 / ln 2 / 4 bits per byte.
  assert pipeline.bits_per_byte(2.0, 4.0) == pytest.approx(2 / math.log(2) / 4)
  with pytest.raises(ConfigError, match='has 300 tokens; set model.vocab_size=300'):
    pipeline.load_splits(c, 0, vocab_size=258)


def test_bytes_are_the_utf8_bytes_of_non_ascii_text(tmp_path):
  """With the byte tokenizer each UTF-8 byte is one token (and each document's EOS counts as
  its newline's byte), so every split has as many bytes as tokens, in any script; in all, the
  files' bytes plus one per document."""
  src = tmp_path / 'src'
  src.mkdir()
  for i in range(10):
    (src / f'{i}.txt').write_text(f'Größe {i}: 日本語のテキスト — ünïcödé\n' * 5, encoding='utf-8')
  meta = prepare(str(src), str(tmp_path / 'out'), '*.txt', val_percent=20, **_quiet())
  splits = [meta['splits'][s] for s in ('train', 'validation')]
  assert all(sp['bytes'] == sp['tokens'] > 0 for sp in splits)
  assert sum(sp['bytes'] for sp in splits) == sum(len(f.read_bytes()) + 1 for f in src.iterdir())


def test_files_the_patterns_leave_out_are_counted_and_said(tmp_path):
  """A folder with 4 .txt files, 2 without an extension (LICENSE, NOTICE), one .rst, one .RST
  and a hidden file: the default patterns take the 4 and say that 4 were left out, by kind,
  and how to take them; --file_glob='*' takes all 8 (the hidden file stays out)."""
  src = tmp_path / 'src'
  src.mkdir()
  for name in ('a.txt', 'b.txt', 'c.txt', 'd.txt', 'LICENSE', 'NOTICE', 'e.rst', 'F.RST',
               '.hidden'):
    (src / name).write_text(f'text of {name}\n' * 40)
  said = []
  prepare(str(src), str(tmp_path / 'out'), val_percent=20, progress=False, log=said.append)
  note = next(line for line in said if line.startswith('left out'))
  assert note.startswith("left out 4 files that --file_glob='*.txt,*.md,*.py,*.jsonl,*.parquet' "
                         'does not match (2 without an extension, 2 *.rst)')
  assert "--file_glob='*' for every file" in note
  said.clear()
  meta = prepare(str(src), str(tmp_path / 'all'), '*', val_percent=20, progress=False,
                 log=said.append)
  assert not any(line.startswith('left out') for line in said)
  assert meta['splits']['train']['docs'] + meta['splits']['validation']['docs'] == 8
  # A folder of many kinds (as /usr/share/doc): the six most common named, the rest counted.
  from collections import Counter
  from moejax.data.documents import left_out_note
  many = Counter({f'.k{i}': 10 - i for i in range(8)})
  assert '(10 *.k0, 9 *.k1, 8 *.k2, 7 *.k3, 6 *.k4, 5 *.k5, and 2 more kinds)' in left_out_note(
      many, '*.md')


@pytest.fixture(scope='module')
def two_corpora(tmp_path_factory):
  """Corpus A of 'a' lines and corpus B of 'b' lines, prepared with the byte tokenizer."""
  root = tmp_path_factory.mktemp('mix')
  out = []
  for letter in 'ab':
    os.makedirs(root / letter)
    for i in range(20):
      (root / letter / f'{i}.txt').write_text((letter * 63 + '\n') * 40)
    prepare(str(root / letter), str(root / f'p{letter}'), '*.txt', val_percent=20,
            shard_tokens=3000, **_quiet())
    out.append(str(root / f'p{letter}'))
  return out


def test_prepared_packing_shuffle_and_exact_iterator_resume(two_corpora):
  c = base_config().data
  c.source, c.prepared_dir, c.seq_len = 'prepared', two_corpora[0], 16
  chunks = pipeline.load_splits(c, 0).train[0]
  stream = chunks.stream.slice(0, len(chunks.stream))
  for i in (0, 5, len(chunks) - 1):
    np.testing.assert_array_equal(chunks[i], stream[i * 16:i * 16 + 17])
  ds = pipeline.train_dataset([chunks], 4, seed=1)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  rest = [next(it)['inputs'] for _ in range(len(chunks) // 4 + 5)]  # crosses an epoch
  resumed = iter(pipeline.train_dataset([chunks], 4, seed=1))
  resumed.set_state(state)
  for a in rest:
    np.testing.assert_array_equal(next(resumed)['inputs'], a)
  again = iter(pipeline.train_dataset([chunks], 4, seed=1))
  np.testing.assert_array_equal(next(again)['inputs'], next(iter(ds))['inputs'])


def test_mixture_is_deterministic_by_seed_and_follows_the_weights(two_corpora):
  a, b = two_corpora
  c = base_config().data
  c.source, c.mixture, c.seq_len = 'prepared', f'{a}=3,{b}=1', 16
  splits = pipeline.load_splits(c, 0)
  assert list(splits.val) == ['pa', 'pb'] and splits.val_weights == {'pa': 0.75, 'pb': 0.25}
  rows = np.concatenate([next(it)['inputs'] for it in [iter(pipeline.train_dataset(
      splits.train, 8, 0, splits.weights))] for _ in range(50)])
  from_a = np.mean(rows[:, 0] != ord('b'))  # a row of corpus A holds no 'b'
  assert from_a == pytest.approx(0.75, abs=0.02)
  again = next(iter(pipeline.train_dataset(splits.train, 8, 0, splits.weights)))['inputs']
  np.testing.assert_array_equal(again, rows[:8])
  other = next(iter(pipeline.train_dataset(splits.train, 8, 1, splits.weights)))['inputs']
  assert not np.array_equal(other, rows[:8])
  with pytest.raises(ConfigError, match=r"config.data.mixture: 'x=y': the weight 'y'"):
    pipeline.parse_weighted('x=y', 'config.data.mixture')


def test_processes_read_disjoint_rows_that_cover_the_global_batch(two_corpora):
  c = base_config().data
  c.source, c.prepared_dir, c.seq_len = 'prepared', two_corpora[0], 16
  chunks = pipeline.load_splits(c, 0).train[0]
  whole = next(iter(pipeline.train_dataset([chunks], 8, 0, process=(0, 1))))['inputs']
  parts = [next(iter(pipeline.train_dataset([chunks], 8, 0, process=(i, 2))))['inputs']
           for i in range(2)]
  assert parts[0].shape == (4, 16)
  np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_eval_batches_zero_means_the_whole_validation_split(two_corpora):
  c = base_config().data
  c.source, c.prepared_dir, c.seq_len = 'prepared', two_corpora[0], 16
  val = pipeline.load_splits(c, 0).val['']
  batches = pipeline.eval_batches(val, 4, 0)
  assert len(batches) == len(val) // 4


def test_bad_prepared_folders_name_the_folder_or_shard(two_corpora, tmp_path):
  import shutil
  c = base_config().data
  c.source, c.seq_len = 'prepared', 16
  for path, match in ((str(tmp_path / 'none'), 'no such folder; make one with python -m '
                       'moejax.prepare'),
                      (str(tmp_path), 'holds no prepared corpus')):
    c.prepared_dir = path
    with pytest.raises(ConfigError, match=f'config.data.prepared_dir=.*{match}'):
      pipeline.load_splits(c, 0)
  for damage, match in (('truncate', 'train-00001.bin|train-00001.array_record is truncated'),
                        ('flip', 'train-00001.array_record is corrupt')):
    bad = str(tmp_path / damage)
    shutil.copytree(two_corpora[0], bad)
    path = os.path.join(bad, 'train-00001.array_record')
    data = bytearray(open(path, 'rb').read())
    if damage == 'truncate':
      data = data[:len(data) // 2]
    else:
      data[len(data) // 2] ^= 0xFF
    open(path, 'wb').write(bytes(data))
    c.prepared_dir = bad
    with pytest.raises(ConfigError, match=f'shard ({match})'):
      pipeline.load_splits(c, 0)
  c.prepared_dir, c.seq_len = two_corpora[0], 16
  splits = pipeline.load_splits(c, 0)
  with pytest.raises(ConfigError, match='config.train.batch_size=4096: the training split has'):
    pipeline.check_batch(splits, 4096, 1)


def test_command_line_errors_are_one_line(tmp_path):
  r = subprocess.run([sys.executable, '-m', 'moejax.prepare', '--inputs', str(tmp_path / 'x'),
                      '--output', str(tmp_path / 'o')], capture_output=True, text=True)
  assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr
  assert "--inputs: '" in r.stderr and 'does not exist' in r.stderr


def test_in_memory_sources_take_a_tokenizer_too(tmp_path):
  from moejax.checks import validate
  src = _corpus(tmp_path, n=10)
  tok = tokenizers.train_bpe((open(os.path.join(src, f)).read() for f in os.listdir(src)
                              if f.endswith('.txt')), 300, str(tmp_path / 'tok'))
  c = base_config()
  c.data.source, c.data.paths, c.data.file_glob, c.data.seq_len = 'files', src, '*.txt', 16
  c.data.tokenizer, c.model.vocab_size = str(tmp_path / 'tok'), 300
  validate(c, 1)
  splits = pipeline.load_splits(c.data, 0, c.model.vocab_size)
  assert isinstance(splits.tokenizer, tokenizers.HFTokenizer)
  val = splits.val['']
  text = tok.decode(val.tokens)
  assert len(val.tokens) < len(text.encode()) and val.bytes_per_token > 1.2
  assert val.stream.num_bytes == len(text.encode()) + val.stream.num_docs  # + 1 per EOS
  c.data.tokenizer = str(tmp_path / 'missing.json')
  with pytest.raises(ConfigError, match="config.data.tokenizer=.*missing.json': no such file"):
    validate(c, 1)


def test_an_unreadable_input_file_is_named(tmp_path):
  pytest.importorskip('pyarrow', reason='Parquet inputs need the data extra (pyarrow)')
  (tmp_path / 'bad.parquet').write_bytes(b'not parquet at all')
  with pytest.raises(ConfigError, match=r'bad.parquet: cannot be read \(Arrow'):
    prepare(str(tmp_path / 'bad.parquet'), str(tmp_path / 'out'), **_quiet())


def test_mixture_of_two_folders_with_one_name_is_refused(two_corpora, tmp_path):
  import shutil
  twin = tmp_path / 'elsewhere' / os.path.basename(two_corpora[0])
  shutil.copytree(two_corpora[0], twin)
  c = base_config().data
  c.source, c.mixture, c.seq_len = 'prepared', f'{two_corpora[0]}=1,{twin}=1', 16
  with pytest.raises(ConfigError, match="two corpora are named 'pa'"):
    pipeline.load_splits(c, 0)


def _named(root, names, size=400):
  os.makedirs(root, exist_ok=True)
  for n in names:
    (root / n).write_text(f'# {n}\n' + 'a few words of text, and more of them. ' * (size // 40))
  return str(root)


def test_a_small_corpus_gets_a_validation_document_decided_before_writing(tmp_path):
  """No name hashes under 1%: the document closest to the threshold is the validation split,
  said in a line; the split is the same on a re-run (decided by the names alone)."""
  # Document names are 'FOLDER/FILE' (documents.find_files): the hash is of those.
  names = [n for n in (f'doc{i}.md' for i in range(200))
           if corpus.split_score(f'docs/{n}') >= 100][:12]
  closest = min(names, key=lambda n: corpus.split_score(f'docs/{n}'))
  src = _named(tmp_path / 'docs', names)
  lines = []
  meta = prepare(src, str(tmp_path / 'out'), '*.md', val_percent=1, progress=False,
                 log=lines.append)
  assert meta['splits']['validation']['docs'] == 1 and meta['splits']['train']['docs'] == 11
  assert any('no document name hashes into the validation split' in l and closest in l
             for l in lines)
  val = shards.open_split(str(tmp_path / 'out'), meta, 'validation')
  text = tokenizers.ByteTokenizer().decode(val.slice(0, len(val)))
  assert text.startswith(f'# {closest}')
  # Every name under 99.99%: the one farthest above goes to train instead.
  assert all(corpus.split_score(f'docs/{n}') < 9999 for n in names)
  meta = prepare(src, str(tmp_path / 'all_val'), '*.md', val_percent=99.99, **_quiet())
  assert meta['splits']['train']['docs'] == 1


def test_one_document_is_refused_before_anything_is_written(tmp_path):
  src = _named(tmp_path / 'one', ['only.md'])
  with pytest.raises(ConfigError, match=r'--inputs: 1 document\(s\); a train and a validation'):
    prepare(src, str(tmp_path / 'out'), '*.md', **_quiet())
  assert not os.path.exists(tmp_path / 'out')


def test_a_folder_left_by_an_interrupted_run_is_finished_or_said_safe_to_delete(tmp_path):
  src = _corpus(tmp_path, n=30)
  out = str(tmp_path / 'out')
  with pytest.raises(KeyboardInterrupt):
    prepare(src, out, '*.txt', val_percent=20, shard_tokens=2000, stop_after_shards=2,
            **_quiet())
  before = sorted(os.listdir(out))
  with pytest.raises(ConfigError, match=r'holds an unfinished run \(safe to delete.*made with '
                     r'--val_percent=20, not 10.*same settings to finish it'):
    prepare(src, out, '*.txt', val_percent=10, shard_tokens=2000, **_quiet())
  assert sorted(os.listdir(out)) == before  # nothing touched
  meta = prepare(src, out, '*.txt', val_percent=20, shard_tokens=2000, **_quiet())
  assert meta['splits']['validation']['docs'] > 0

