"""Seeds until decided: after an experiment's planned seeds, add seeds in rounds to the
(rung, arm) comparisons still inconclusive, cheapest to decide first, until each has a verdict,
reaches --max_seeds, or the time budget is spent.

Looking at the data after every round and stopping once a test passes would inflate false
verdicts if each look were tested at ALPHA. The design fixes the looks in advance: a comparison
is analysed at its planned seeds and after each completed round of `round` more, up to
`max_seeds`, so at most `looks = 1 + ceil((max_seeds - first) / round)` times; every test runs
at ALPHA / looks (a Bonferroni group-sequential boundary). By the union bound the chance that
any look gives a false verdict is at most ALPHA, however strongly the looks depend on each
other, and Holm's correction over the arms then holds over valid p-values (statistics.py). An
exact Pocock or O'Brien-Fleming boundary would be less conservative, but no library on these
machines computes one for t-statistics (confseq needs the Boost headers, `expectation` Python
3.12, statsmodels and scipy have no group-sequential design); the tests show the error rates by
simulation (tests/test_sequential.py).

A round that was cut short (the budget, an interruption) is finished by the next invocation
before the comparison is looked at again: the verdict rests on the last completed look, and the
report says which look and how many seeds. The design and every round's runs are kept in
DIR/sequential.json, so an invocation resumes the same design (changing it after a look would
undo its guarantee, and is refused).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re

from moejax.errors import ConfigError
from moejax.experiment import pairing, statistics
from moejax.training.metrics import write_json

FILE = 'sequential.json'


@dataclasses.dataclass(frozen=True)
class Design:
  """The looks of one rung's comparisons: at `first` seeds, then every `round` more, up to
  `max_seeds` (the last look is max_seeds even where a round overshoots it)."""
  first: int
  round: int
  max_seeds: int

  @property
  def looks(self) -> int:
    return len(self.sizes())

  def sizes(self) -> list[int]:
    """The seeds at each look, in order."""
    out = list(range(self.first, self.max_seeds, self.round))
    return out + [self.max_seeds] if not out or out[-1] < self.max_seeds else out

  def analysed(self, n: int) -> tuple[int, int]:
    """(seeds, look number from 1) of the last completed look with n seeds run; (n, 0)
    before the first look."""
    done = [s for s in self.sizes() if s <= n]
    return (done[-1], len(done)) if done else (n, 0)

  def next_size(self, n: int) -> int | None:
    """The seeds of the next look after n, or None after the last."""
    later = [s for s in self.sizes() if s > n]
    return later[0] if later else None


@dataclasses.dataclass
class Until:
  """What --until_decided asks: the time budget of this invocation (seconds), the most seeds a
  comparison may reach, and the seeds a round adds."""
  budget_s: float
  max_seeds: int = 12
  round: int = 2


def parse_budget(text: str) -> float:
  """'3h', '90m', '1h30m', '45s', '2.5h' -> seconds."""
  parts = re.fullmatch(r'\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*',
                       text or '')
  if not text or not parts or not any(parts.groups()):
    raise ConfigError(f'--budget={text}: give a duration such as 3h, 90m, 1h30m or 45s')
  h, m, s = (float(g or 0) for g in parts.groups())
  seconds = 3600 * h + 60 * m + s
  if seconds <= 0:
    raise ConfigError(f'--budget={text}: the budget must be more than zero')
  return seconds


def declare(workdir: str, until: Until, first: dict) -> dict:
  """Write the design to DIR/sequential.json, or check it against the one already there.

  Args:
    first: {rung or None: the planned seeds of that rung's comparisons}.
  Returns:
    the file's content: {'round', 'max_seeds', 'first': {rung: n}, 'rounds': [[run keys]]}.
  """
  for rung, n in first.items():
    who = f'rung {rung!r}' if rung else 'the experiment'
    if n < 2:
      raise ConfigError(f'--until_decided: {who} plans {n} seed; a t-test needs 2 (give '
                        '--seeds=2 or more)')
    if until.max_seeds <= n:
      raise ConfigError(f'--max_seeds={until.max_seeds}: {who} plans {n} seeds already; give '
                        f'more than {n}')
  if until.round < 1:
    raise ConfigError(f'--round={until.round}: a round adds at least 1 seed')
  path = os.path.join(workdir, FILE)
  state = {'round': until.round, 'max_seeds': until.max_seeds,
           'first': {_name(r): n for r, n in first.items()}, 'rounds': []}
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    for key, flag in (('round', '--round'), ('max_seeds', '--max_seeds')):
      if old[key] != state[key]:
        raise ConfigError(
            f'{flag}={state[key]}: this workdir\'s seeds-until-decided design has {flag}='
            f'{old[key]} ({path}); changing it after looking at the data voids its error rates: '
            f'give {flag}={old[key]}, or use a new --workdir')
    old['first'] = {**state['first'], **old['first']}  # rungs asked for the first time
    state = old
  os.makedirs(workdir, exist_ok=True)
  write(workdir, state)
  return state


def load(workdir: str) -> dict | None:
  """DIR/sequential.json, or None where no seeds were added until decided."""
  path = os.path.join(workdir, FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write(workdir: str, state: dict):
  write_json(os.path.join(workdir, FILE), state, indent=1)


def _name(rung) -> str:
  return rung or ''


def designs(state: dict | None) -> dict:
  """{rung or None: Design} of a sequential.json ({} without one)."""
  if not state:
    return {}
  return {(r or None): Design(n, state['round'], state['max_seeds'])
          for r, n in state['first'].items()}


def seeds_to_decide(c: statistics.Comparison, alpha: float) -> float:
  """The seeds (pairs, or per arm) at which this comparison would likely be decided, from its
  observed difference and spread: the fewer of those a t-test at alpha needs to detect the
  difference with 80% power, and those the two one-sided tests at alpha need to place it inside
  the margin (a one-sided test at alpha is a two-sided one at 2 alpha). Only an ordering of the
  comparisons: the observed difference is itself uncertain."""
  if not c.sd > 0:
    return float(c.n)
  detect = statistics.seeds_for_power(abs(c.diff) / c.sd, c.paired, alpha) if c.diff else math.inf
  inside = (statistics.seeds_for_power((c.delta - abs(c.diff)) / c.sd, c.paired, 2 * alpha)
            if abs(c.diff) < c.delta else math.inf)
  return min(detect, inside)


def next_seeds(arm_seeds: list, base_seeds: list, used: set, k: int) -> list:
  """The k seeds to add to a comparison: first those the baseline already ran and the arm has
  not (another arm's rounds added them), then fresh seeds above every seed used at the rung."""
  have = set(arm_seeds)
  out = [s for s in base_seeds if s not in have][:k]
  fresh = max(used | have | set(base_seeds), default=-1) + 1
  while len(out) < k:
    out.append(fresh)
    fresh += 1
  return out


def next_round(exp, configs: dict, results: dict, designs: dict, add) -> dict:
  """The runs of the next round: for each comparison still inconclusive before its last look,
  the seeds to its next look (for the arm, and for the baseline where it lacks them), cheapest
  to decide first (seeds_to_decide x the seconds its runs took).

  Args:
    configs: {RunKey: config} planned and added so far; results: {rung: {arm: [result]}};
    designs: {rung: Design}; add: (rung, arm, seed) -> (RunKey, its config, validated).
  Returns:
    {RunKey: config} of the new runs, in the order to train them.
  """
  cells = []
  for rung, by_arm in results.items():
    design = designs.get(rung)
    if design is None or exp.baseline not in by_arm:
      continue
    arms = list(dict.fromkeys(k.arm for k in configs if k.rung == rung))
    for arm, c in pairing.comparisons(exp, by_arm, configs, rung, arms, design).items():
      nxt = design.next_size(c.n)
      if c.verdict != 'inconclusive' or nxt is None:
        continue
      need = seeds_to_decide(c, statistics.ALPHA / design.looks)
      seconds = min((r.get('wall_s', 0.0) for r in by_arm[arm]), default=0.0)
      cells.append((max(need - c.n, 1) * max(seconds, 1.0), rung, arm, nxt - c.n))
  new = {}
  for _, rung, arm, k in sorted(cells, key=lambda t: t[0]):
    keys = list(configs) + list(new)
    of = lambda a: [j.seed for j in keys if (j.rung, j.arm) == (rung, a)]  # noqa: E731
    used = {j.seed for j in keys if j.rung == rung}
    for seed in next_seeds(of(arm), of(exp.baseline), used, k):
      for a in (arm, exp.baseline):
        if not any((j.rung, j.arm, j.seed) == (rung, a, seed) for j in keys + list(new)):
          key, config = add(rung, a, seed)
          new[key] = config
  return new
