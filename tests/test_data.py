"""Corpus split, packing, the Grain pipeline, and exact iterator resume."""
import numpy as np

from moejax.config import base_config
from moejax.data import corpus, pipeline
from moejax.data.tokenizer import ByteTokenizer


def test_stdlib_split_is_by_file_deterministic_and_disjoint():
  files = corpus.list_files('stdlib')
  assert len(files) > 100 and all(rel.endswith('.py') for rel, _ in files)
  assert not any('site-packages' in rel for rel, _ in files)
  train, val = corpus.split_files(files, 5)
  train2, val2 = corpus.split_files(corpus.list_files('stdlib'), 5)
  assert train == train2 and val == val2
  assert not {r for r, _ in train} & {r for r, _ in val}
  assert 0.02 < len(val) / len(files) < 0.09


def test_packing_joins_documents_with_eos():
  docs = [np.frombuffer(b'ab', np.uint8), np.frombuffer(b'cde', np.uint8)]
  tokens = pipeline.pack(docs, order=[1, 0])
  eos = ByteTokenizer.eos_id
  np.testing.assert_array_equal(tokens, [99, 100, 101, eos, 97, 98, eos])
  chunks = pipeline.PackedChunks(tokens, seq_len=3)
  assert len(chunks) == 2
  np.testing.assert_array_equal(chunks[1], [eos, 97, 98, eos])  # overlaps by one: the target


def test_user_files_source(tmp_path):
  for name, text in (('a.txt', 'hello world ' * 50), ('b.txt', 'goodbye moon ' * 50)):
    (tmp_path / name).write_text(text)
  c = base_config().data
  c.source, c.paths, c.file_glob, c.seq_len = 'files', str(tmp_path), '*.txt', 16
  splits = pipeline.load_splits(c, seed=0)
  assert splits.num_train_docs == 1 and splits.num_val_docs == 1
  text = (ByteTokenizer().decode(splits.train[0].tokens)
          + ByteTokenizer().decode(splits.val[''].tokens))
  assert 'hello world' in text and 'goodbye moon' in text


def test_shuffle_is_seeded_and_iterator_resumes_exactly():
  tokens = np.arange(2000, dtype=np.uint16) % 256
  chunks = pipeline.PackedChunks(tokens, seq_len=8)
  ds = pipeline.train_dataset(chunks, batch_size=4, seed=1)
  it = iter(ds)
  first = [next(it)['inputs'] for _ in range(5)]
  state = it.get_state()
  rest = [next(it)['inputs'] for _ in range(70)]  # crosses an epoch boundary (249 chunks)
  resumed = iter(pipeline.train_dataset(chunks, batch_size=4, seed=1))
  resumed.set_state(state)
  for a in rest:
    np.testing.assert_array_equal(next(resumed)['inputs'], a)
  other = next(iter(pipeline.train_dataset(chunks, batch_size=4, seed=2)))['inputs']
  assert not np.array_equal(other, first[0])
  batch = first[0]
  assert batch.shape == (4, 8)


def test_unigram_entropy():
  assert abs(pipeline.unigram_entropy(np.array([0, 1, 0, 1])) - np.log(2)) < 1e-12
