"""Write python_next_line.jsonl, the multiple-choice task the experiments evaluate every run on.

    python experiments/tasks/make_python_next_line.py [--items 1000] [--out FILE]

Each item is a place in a held-out file of the experiments' corpus (the Python standard
library's validation files, as `moejax.data.corpus` splits them at the base config's
`data.val_percent`: no run trains on them): the context is the 30 bytes before a line's first
non-blank character (its indentation included), the right continuation is the rest of that line
with its newline, and the three wrong ones are lines of other held-out files of the same length
(so length tells nothing: acc and acc_norm rank the choices alike).
Context and continuation stay within the 64 bytes the experiments train on. Chance is 25%.

The shipped file was written by this script from CPython 3.11's standard library; the split is
by a hash of the file's path, so the same files are held out on any machine, whatever their
contents there.
"""
from __future__ import annotations

import argparse
import json
import os
import random

CONTEXT = 30  # bytes of context before the line
MIN_LINE, MAX_LINE = 8, 31  # the continuation's length in bytes, newline excluded
CHOICES = 4


def candidate_lines(text: str) -> list[tuple[str, str]]:
  """(context, line) of every line that can be asked about: ASCII, not blank, not a comment,
  MIN_LINE to MAX_LINE bytes, with CONTEXT bytes of the file before it."""
  out = []
  offset = 0
  for raw in text.splitlines(keepends=True):
    start = offset
    offset += len(raw)
    body = raw.rstrip('\n').rstrip()
    stripped = body.lstrip()
    if not raw.isascii() or not stripped or stripped.startswith('#'):
      continue
    if not MIN_LINE <= len(stripped) <= MAX_LINE:
      continue
    indent = len(body) - len(stripped)
    cut = start + indent
    if cut < CONTEXT or not text[cut - CONTEXT:cut].isascii():
      continue
    out.append((text[cut - CONTEXT:cut], stripped + '\n'))
  return out


def make(items: int, seed: int = 0) -> list[dict]:
  """items questions drawn from every held-out file (deterministic for a seed)."""
  from moejax.config import base_config
  from moejax.data import corpus
  data = base_config().data
  files = corpus.list_files('stdlib', pattern=data.file_glob)
  _, val = corpus.split_files(files, data.val_percent)
  rng = random.Random(seed)
  by_file = []
  for rel, full in val:
    with open(full, encoding='utf-8', errors='replace') as f:
      lines = candidate_lines(f.read())
    if lines:
      by_file.append((rel, lines))
  pool = [(i, line) for i, (_, lines) in enumerate(by_file) for _, line in lines]
  places = [(i, c, line) for i, (_, lines) in enumerate(by_file) for c, line in lines]
  rng.shuffle(places)
  out = []
  for i, context, line in places:
    if len(out) == items:
      break
    similar = [other for j, other in pool if j != i and other != line and
               len(other) == len(line)]
    if len(set(similar)) < CHOICES - 1:
      continue  # too few lines of this length to choose from
    wrong = []
    while len(wrong) < CHOICES - 1:
      pick = rng.choice(similar)
      if pick not in wrong:
        wrong.append(pick)
    answer = rng.randrange(CHOICES)
    choices = wrong[:answer] + [line] + wrong[answer:]
    out.append({'context': context, 'choices': choices, 'answer': answer,
                'file': by_file[i][0]})
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--items', type=int, default=1000, help='questions to write')
  p.add_argument('--seed', type=int, default=0, help='the draw of places and wrong lines')
  p.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               'python_next_line.jsonl'), help='the file written')
  a = p.parse_args()
  rows = make(a.items, a.seed)
  with open(a.out, 'w') as f:
    for r in rows:
      f.write(json.dumps(r) + '\n')
  print(f'{len(rows)} questions from {len({r["file"] for r in rows})} held-out files: {a.out}')


if __name__ == '__main__':
  main()
