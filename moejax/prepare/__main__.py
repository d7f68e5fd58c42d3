"""python -m moejax.prepare --inputs=PATHS --output=DIR [--vocab_size=N | --tokenizer=FILE]

Tokenizes text files, JSONL and Parquet into token shards that training reads with
--config.data.source=prepared --config.data.prepared_dir=DIR (see moejax/prepare/__init__.py).
"""
from __future__ import annotations

import sys


def parser():
  from moejax import cli
  p = cli.ArgumentParser(prog='python -m moejax.prepare', description=__doc__.split('\n')[0])
  p.add_argument('--inputs', required=True,
                 help="files and folders, comma-separated ('stdlib': Python's standard library)")
  p.add_argument('--output', required=True, help='the prepared folder (new, or to finish)')
  p.add_argument('--file_glob', default='*.txt,*.md,*.py,*.jsonl,*.parquet',
                 help='patterns of the files taken from folders, comma-separated')
  p.add_argument('--text_field', default='text', help='JSONL field or Parquet column')
  p.add_argument('--tokenizer', default='bytes',
                 help="'bytes', a tokenizer.json (or its folder) or a SentencePiece .model")
  p.add_argument('--vocab_size', type=int, default=0,
                 help='train a byte-level BPE tokenizer of this size on the train split first')
  p.add_argument('--format', default='array_record', help='array_record or bin')
  p.add_argument('--val_percent', type=float, default=1.0,
                 help='share of documents for validation, by a hash of their names')
  p.add_argument('--shard_tokens', type=int, default=1 << 24, help='tokens per shard')
  p.add_argument('--batch_mb', type=float, default=16,
                 help='text tokenized at once (with shard_tokens, the memory bound)')
  p.add_argument('--no_progress', action='store_true', help='no progress bar')
  p.add_argument('--stop_after_shards', type=int, default=0,
                 help='stop after writing this many shards, as if interrupted (for tests; 0: '
                 'never)')
  return p


def _main(argv=None) -> int:
  from moejax.prepare import prepare
  a = parser().parse_args(argv)
  try:
    prepare(a.inputs, a.output, a.file_glob, a.text_field, a.tokenizer, a.vocab_size, a.format,
            a.val_percent, a.shard_tokens, a.batch_mb, not a.no_progress, a.stop_after_shards)
  except KeyboardInterrupt:
    print('interrupted: the shards written so far are kept; run the same command again to '
          'finish', file=sys.stderr)
    return 130
  return 0


def main(argv=None) -> int:
  from moejax import cli
  return cli.run(_main, argv)


if __name__ == '__main__':
  sys.exit(main())
