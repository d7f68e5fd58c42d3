"""Seeds until decided (moejax/experiment/sequential.py and the runner's rounds): the design's
looks by hand, the error rates of looking after every round by simulation (under no difference,
and at the equivalence margin), and the runner end to end on hand-made results: rounds to the
undecided comparisons only, the baseline's seeds shared, the budget, resuming, the design fixed
once it has looked, the report's looks."""
import json
import math
import os

import numpy as np
import pytest

from moejax import experiment
from moejax.errors import ConfigError
from moejax.experiment import Experiment, Rung, runner, sequential as sq, statistics as st


def test_the_looks_of_a_design():
  d = sq.Design(first=5, round=2, max_seeds=12)
  assert d.sizes() == [5, 7, 9, 11, 12] and d.looks == 5  # the last round stops at max_seeds
  assert d.analysed(4) == (4, 0) and d.analysed(5) == (5, 1) and d.analysed(8) == (7, 2)
  assert d.analysed(12) == (12, 5) and d.analysed(30) == (12, 5)
  assert d.next_size(5) == 7 and d.next_size(6) == 7 and d.next_size(11) == 12
  assert d.next_size(12) is None
  assert sq.Design(3, 4, 11).sizes() == [3, 7, 11] and sq.Design(3, 9, 4).sizes() == [3, 4]


def test_budgets_and_their_refusals():
  assert sq.parse_budget('3h') == 10800 and sq.parse_budget('90m') == 5400
  assert sq.parse_budget('1h30m') == 5400 and sq.parse_budget('45s') == 45
  assert sq.parse_budget('2.5h') == 9000 and sq.parse_budget('1h 2m 3s') == 3723
  for bad in ('', '3', 'h', '3d', '0h', '-1h', 'soon'):
    with pytest.raises(ConfigError, match='--budget='):
      sq.parse_budget(bad)


def test_the_next_seeds_reuse_the_baselines_runs_first():
  # Another arm's rounds gave the baseline seeds 3 and 4: this arm takes them, then fresh ones
  # above every seed used at the rung (7 was used by a third arm).
  assert sq.next_seeds([0, 1, 2], [0, 1, 2, 3, 4], {0, 1, 2, 3, 4, 7}, 3) == [3, 4, 8]
  assert sq.next_seeds([0, 1, 2], [0, 1, 2], {0, 1, 2}, 2) == [3, 4]


def test_seeds_to_decide():
  """A difference of half an sd is detected (80% power, two-sided at alpha) with 34 pairs at
  0.05 (Cohen's table), more at 0.01; inside the margin, the two one-sided tests need the
  margin's distance at 2 alpha; the fewer of the two."""
  a, b = np.array([0.5, 1.5, 0.0, 1.0]), np.zeros(4)  # mean 0.75
  c = st.compare(a, b, 0.1, True, power=False)
  effect = 0.75 / c.sd
  assert sq.seeds_to_decide(c, 0.05) == st.seeds_for_power(effect, True, 0.05)
  assert sq.seeds_to_decide(c, 0.01) > sq.seeds_to_decide(c, 0.05)
  c = st.compare(a, b, 2.0, True, power=False)  # inside the margin too: the fewer
  inside = st.seeds_for_power((2.0 - 0.75) / c.sd, True, 0.1)
  assert sq.seeds_to_decide(c, 0.05) == min(inside, st.seeds_for_power(effect, True, 0.05))
  assert st.seeds_for_power(0.5, True, 0.05) == 34


def _simulate(shift: float, delta: float, sims: int, design: sq.Design, looks: int,
              seed: int = 0) -> float:
  """The rate of experiments (two arms against a baseline, paired, unit noise per run) with a
  false claim when every undecided comparison gets the next look's seeds until decided or out
  of looks: any better/worse when shift is 0; any equivalence ('equivalent' or 'within
  delta') when the true difference is the margin itself."""
  rng = np.random.default_rng(seed)
  false = 0
  for _ in range(sims):
    base = rng.normal(0, 1, design.max_seeds)
    runs = {a: base + shift + rng.normal(0, 1, design.max_seeds) for a in ('x', 'y')}
    n = {a: design.first for a in runs}
    while True:
      comps = st.verdicts({a: st.compare(runs[a][:n[a]], base[:n[a]], delta, True, power=False)
                           for a in runs}, looks=looks)
      going = [a for a, c in comps.items()
               if c.verdict == 'inconclusive' and design.next_size(n[a])]
      if not going:
        break
      for a in going:
        n[a] = design.next_size(n[a])
    claims = [c.verdict for c in comps.values()]
    false += any(v.startswith(('better', 'worse')) for v in claims) if shift == 0 else any(
        v == 'equivalent' or v.endswith('within delta') for v in claims)
  return false / sims


def test_looking_after_every_round_keeps_false_verdicts_at_5_percent():
  """Five looks (3, 5, 7, 9, 11 seeds), 400 simulated experiments of two arms each. With no true
  difference, tested at 0.05 / 5 per look: at most 5% of experiments claim any difference;
  tested at 0.05 per look (no correction) the rate is far above. With the true difference on
  the margin, likewise for a claim of equivalence."""
  design = sq.Design(3, 2, 11)
  assert design.looks == 5
  assert _simulate(0.0, 0.5, 400, design, looks=5) <= 0.05
  assert _simulate(0.0, 0.5, 400, design, looks=1) > 0.10  # the looks inflate an uncorrected test
  assert _simulate(1.0, 1.0, 400, design, looks=5, seed=1) <= 0.05
  assert _simulate(1.0, 1.0, 400, design, looks=1, seed=1) > 0.08


# The runner end to end, on hand-made results: no training.

class Clock:
  """A stand-in for the time module: each fake run advances it by the run's seconds."""
  def __init__(self):
    self.now = 1000.0

  def time(self):
    return self.now


def _experiment(tiny_config):
  return Experiment(name='seq', base=tiny_config(), seeds=(0, 1, 2), baseline='base', delta=0.002,
                    arms={'base': {}, 'clearly_better': {}, 'close': {}},
                    rungs={'small': Rung({}), 'large': Rung({}, seeds=(0, 1, 2, 3))})


ARMS = ('base', 'clearly_better', 'close')


def _fake_training(monkeypatch, clock, trained, wall=60.0):
  """Runs whose val loss depends on the arm and the seed only: clearly_better 0.1 below the
  baseline with little noise (decided at once), close 0.004 above with noise 0.01 (too close
  for a verdict at any look here)."""
  def train_one(exp, key, c, workdir, run_dir, train, upcycle, smoke, manager):
    trained.append(key)
    clock.now += wall
    noise = np.random.default_rng(key.seed).normal(0, 1, 3)
    own = np.random.default_rng([key.seed, ARMS.index(key.arm)]).normal(0, 1)
    loss = 2.0 + 0.05 * noise[0] + {'base': 0.0, 'clearly_better': -0.1 + 0.002 * own,
                                    'close': 0.004 + 0.01 * own}[key.arm]
    return {'val_loss': loss, 'val_bpb': loss, 'train_flops': 1e9, 'final_step': 4,
            'train_tokens': 100, 'wall_s': wall}
  monkeypatch.setattr(runner, '_train_one', train_one)
  monkeypatch.setattr(runner, 'time', clock)


def test_rounds_go_to_the_undecided_comparisons_until_the_budget(tmp_path, monkeypatch):
  from conftest import tiny_config
  exp = _experiment(tiny_config)
  clock, trained = Clock(), []
  _fake_training(monkeypatch, clock, trained)
  workdir = str(tmp_path / 'exp')
  said = []
  # 21 planned runs (3 + 4 seeds x 3 arms), then rounds: 'close' at each rung gets 2 seeds a
  # round (and the baseline those seeds), 'clearly_better' none. A budget of 40 runs' time.
  until = sq.Until(budget_s=40 * 60.0, max_seeds=9, round=2)
  runner.run(exp, workdir, progress=False, log=said.append, until=until)
  planned = [k for k in trained if k.seed <= 3 and (k.seed < 3 or k.rung == 'large')]
  assert len(planned) == 21 and trained[:21] == planned
  added = trained[21:]
  assert {k.arm for k in added} == {'close', 'base'}
  assert len(trained) == 40  # the budget: 40 runs of 60 s
  state = json.load(open(os.path.join(workdir, 'sequential.json')))
  assert state['first'] == {'small': 3, 'large': 4} and state['max_seeds'] == 9
  first = state['rounds'][0]
  assert sorted(map(tuple, first)) == sorted(
      [(r, a, s) for r, seeds in (('small', (3, 4)), ('large', (4, 5))) for s in seeds
       for a in ('close', 'base')])
  assert any('the budget is spent' in line for line in said)
  md = open(os.path.join(workdir, 'results.md')).read()
  small = md[md.index('## Rung `small`'):md.index('## Rung `large`')]
  row = next(line for line in small.splitlines() if line.startswith('| clearly_better | paired |'))
  assert '| 3 | 1 of 4 |' in row and '**better**' in row  # decided at its first look
  row = next(line for line in small.splitlines() if line.startswith('| close | paired |'))
  # the small rung looks at 3, 5, 7, 9 seeds; the runs beyond the last completed look wait
  seeds, look = int(row.split('|')[3]), row.split('|')[4].strip()
  assert look == f'{sq.Design(3, 2, 9).analysed(seeds)[1]} of 4' and seeds in (5, 7, 9)
  assert 'each test at 0.05 / 4' in small

  # The same command resumes: first the runs its last round left, then more rounds until every
  # comparison is decided or at max_seeds; nothing trained twice.
  before = len(trained)
  runner.run(exp, workdir, progress=False, log=said.append,
             until=sq.Until(budget_s=1e6, max_seeds=9, round=2))
  assert len(set(trained)) == len(trained) > before
  counts = {}
  for k in trained:
    counts[(k.rung, k.arm)] = counts.get((k.rung, k.arm), 0) + 1
  assert counts[('small', 'close')] == 9 and counts[('large', 'close')] == 9
  assert counts[('small', 'clearly_better')] == 3 and counts[('large', 'clearly_better')] == 4
  assert counts[('small', 'base')] == 9
  # A plain run of the same workdir reports the added seeds and the same design.
  monkeypatch.setattr(runner, '_train_one', lambda *a: pytest.fail('trained again'))
  runner.run(exp, workdir, progress=False, log=said.append)
  md = open(os.path.join(workdir, 'results.md')).read()
  assert md.count('| close | paired | 9 | 4 of 4 |') == 2  # looks 3, 5, 7, 9 and 4, 6, 8, 9
  # Changing the design after looking is refused, and nothing is written.
  kept = open(os.path.join(workdir, 'sequential.json')).read()
  with pytest.raises(ConfigError, match=r'--max_seeds=12: .* has --max_seeds=9'):
    runner.run(exp, workdir, progress=False, until=sq.Until(1e6, max_seeds=12, round=2))
  with pytest.raises(ConfigError, match=r'--round=3: .* has --round=2'):
    runner.run(exp, workdir, progress=False, until=sq.Until(1e6, max_seeds=9, round=3))
  assert open(os.path.join(workdir, 'sequential.json')).read() == kept


def test_the_flags_are_checked_before_anything_runs(tmp_path, capsys):
  from moejax.experiment.command import main
  workdir = tmp_path / 'w'
  nobase = tmp_path / 'nobase.py'
  nobase.write_text('def get_experiment():\n  from moejax import cli\n'
                    '  from moejax.experiment import Experiment\n'
                    "  return Experiment(name='nobase', base=cli.load_config('quickstart'), "
                    "arms={'a': {}, 'b': {}})\n")
  for argv, says in (
      ([str(nobase), f'--workdir={workdir}', '--until_decided', '--budget=1h', '--max_seeds=1'],
       "experiment 'nobase' compares no arms with a baseline"),
      (['bias_rules', f'--workdir={workdir}', '--budget=3h'],
       '--budget applies to --until_decided only'),
      (['bias_rules', f'--workdir={workdir}', '--until_decided'], '--until_decided needs --budget'),
      (['bias_rules', f'--workdir={workdir}', '--until_decided', '--budget=soon'],
       '--budget=soon: give a duration'),
      (['bias_rules', f'--workdir={workdir}', '--until_decided', '--budget=1h', '--round=0'],
       '--round=0: a round adds at least 1 seed'),
      (['bias_rules', f'--workdir={workdir}', '--until_decided', '--budget=1h',
        '--max_seeds=3'], '--max_seeds=3: the experiment plans 5 seeds already')):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    assert not workdir.exists()


def test_the_round_goes_cheapest_first():
  """Two undecided comparisons at 3 seeds: 'near' (difference 0.02, noise 0.02: its t-test
  needs about a dozen pairs) before 'far' (difference 0.002 at the same noise: hundreds), each
  given the seeds to its next look (3 -> 5), the baseline once."""
  from conftest import tiny_config
  exp = Experiment(name='order', base=tiny_config(), seeds=(0, 1, 2), baseline='base',
                   delta=0.0001, arms={'base': {}, 'far': {}, 'near': {}})
  configs = experiment.plan(exp)
  noise = [0.02, -0.01, -0.01]
  results = {None: {'base': [{'val_loss': 2.0, 'wall_s': 10.0}] * 3,
                    'far': [{'val_loss': 2.002 + e, 'wall_s': 10.0} for e in noise],
                    'near': [{'val_loss': 2.02 + e, 'wall_s': 10.0} for e in noise]}}
  design = sq.Design(3, 2, 9)
  new = sq.next_round(exp, configs, results, {None: design},
                      lambda r, a, s: (runner.RunKey(r, a, s), None))
  assert [(k.arm, k.seed) for k in new] == [('near', 3), ('base', 3), ('near', 4), ('base', 4),
                                            ('far', 3), ('far', 4)]


@pytest.mark.parametrize('wider', [False, True])
def test_a_verdict_rests_on_the_last_completed_look(wider):
  """8 seeds run where the looks are at 3, 5, 7, 9: the comparison uses the first 7 (in the
  order they ran), paired or not (a wider arm cannot pair), and is corrected for 4 looks."""
  from conftest import tiny_config
  from moejax.experiment import pairing
  arms = {'base': {}, 'x': {'model.moe.expert_ffn_dim': 32} if wider else {}}
  exp = Experiment(name='look', base=tiny_config(), seeds=tuple(range(8)), baseline='base',
                   delta=0.01, arms=arms)
  configs = experiment.plan(exp)
  base = [2.0, 2.1, 1.9, 2.05, 2.2, 1.95, 2.0, 3.0]
  arm = [b + d for b, d in zip(base, [0.01, 0.03, 0.02, 0.0, 0.04, 0.01, 0.02, -2.0])]
  results = {'base': [{'val_loss': v} for v in base], 'x': [{'val_loss': v} for v in arm]}
  c = pairing.comparisons(exp, results, configs, None, list(arms), sq.Design(3, 2, 9))['x']
  assert c.paired == (not wider) and c.n == 7 and c.looks == 4
  want = np.mean(arm[:7]) - np.mean(base[:7])
  assert c.diff == pytest.approx(want)  # the 8th seed (-2.0) would flip the sign
