"""Write python_line_end.jsonl, the multiple-choice task the experiments score every run on.

    python experiments/tasks/make_python_line_end.py [--items 1000] [--out FILE]

Each item is a line of a held-out file of the experiments' corpus (the Python standard library's
validation files, as `moejax.data.corpus` splits them at the base config's `data.val_percent`:
no run trains on them). The line is cut a few bytes before its end: the context is the 40 bytes
before the cut (the line's start, and the lines before it), the right ending the rest of the
line with its newline (6, 8, 10 or 12 bytes), and the three wrong endings are the endings of
lines of other held-out files with the same length, so length tells nothing (acc and acc_norm
rank the choices alike). Context and ending stay within the 64 bytes the experiments train on.
Chance is 25%.

The shipped file was written by this script from CPython 3.11's standard library; the split is
by a hash of the file's path, so the same files are held out on any machine, whatever their
contents there.
"""
from __future__ import annotations

import argparse
import json
import os
import random

CONTEXT = 40  # bytes before the cut
ENDINGS = (6, 8, 10, 12)  # the ending's length in bytes, newline included
CHOICES = 4


def places(text: str, rng: random.Random) -> list[tuple[str, str]]:
  """(context, ending) of every line that can be asked about: ASCII, not a comment, ending in a
  newline, at least 3 bytes of the line's text left in the context, CONTEXT bytes before the
  cut."""
  out = []
  offset = 0
  for raw in text.splitlines(keepends=True):
    start = offset
    offset += len(raw)
    n = rng.choice(ENDINGS)
    body = raw.rstrip()
    stripped = body.lstrip()
    if not raw.isascii() or not raw.endswith('\n') or stripped.startswith('#'):
      continue
    if len(stripped) < n - 1 + 3:
      continue
    cut = start + len(body) - (n - 1)
    if cut < CONTEXT or not text[cut - CONTEXT:cut].isascii():
      continue
    out.append((text[cut - CONTEXT:cut], body[-(n - 1):] + '\n'))
  return out


def make(items: int, seed: int = 0) -> list[dict]:
  """items questions drawn from every held-out file (deterministic for a seed)."""
  from moejax.config import base_config
  from moejax.data import corpus
  data = base_config().data
  files = corpus.list_files('stdlib', pattern=data.file_glob)
  _, val = corpus.split_files(files, data.val_percent)
  rng = random.Random(seed)
  asked, endings = [], {}  # endings: length -> [(file, ending)]
  for rel, full in val:
    with open(full, encoding='utf-8', errors='replace') as f:
      for context, ending in places(f.read(), rng):
        asked.append((rel, context, ending))
        endings.setdefault(len(ending), []).append((rel, ending))
  rng.shuffle(asked)
  out = []
  for rel, context, ending in asked:
    if len(out) == items:
      break
    others = [e for f, e in endings[len(ending)] if f != rel and e != ending]
    if len(set(others)) < CHOICES - 1:
      continue
    wrong = []
    while len(wrong) < CHOICES - 1:
      pick = rng.choice(others)
      if pick not in wrong:
        wrong.append(pick)
    answer = rng.randrange(CHOICES)
    out.append({'context': context, 'choices': wrong[:answer] + [ending] + wrong[answer:],
                'answer': answer, 'file': rel})
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--items', type=int, default=1000, help='questions to write')
  p.add_argument('--seed', type=int, default=0, help='the draw of lines, cuts and wrong endings')
  p.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               'python_line_end.jsonl'), help='the file written')
  a = p.parse_args()
  rows = make(a.items, a.seed)
  with open(a.out, 'w') as f:
    for r in rows:
      f.write(json.dumps(r) + '\n')
  print(f'{len(rows)} questions from {len({r["file"] for r in rows})} held-out files: {a.out}')


if __name__ == '__main__':
  main()
