"""The experiment runner (moejax/experiment/) and the experiment files: every run's config and
post-evaluation config validated before anything trains, tables, plots, no re-runs, diverged
runs as results, compute ladders, and the report's statistics on hand-made results."""
import json
import math
import os
import pathlib

import jax
import numpy as np
import pytest

from moejax import experiment
from moejax.checks import validate
from moejax.config import ConfigError
from moejax.costs.parameters import count_params
from moejax.errors import Diverged
from moejax.experiment import Experiment, PostEval, Rung, report

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / 'experiments'
NAMES = ['token_vs_expert_choice', 'balancing', 'balance_by_depth', 'router_families',
         'capacity_factor', 'granularity', 'upcycling', 'bias_rules', 'dynamic_compute']


def load(name, arg=None):
  module = experiment.load_module(str(EXPERIMENTS / f'{name}.py'))
  return module.get_experiment(arg) if arg else module.get_experiment()


@pytest.mark.parametrize('name', NAMES)
def test_every_run_and_post_evaluation_validates(name):
  """Every arm x rung x seed, full size and smoke, and every post-evaluation of each, is
  validated as plan() validates it before the first compile; the models trace."""
  exp = load(name)
  assert len(exp.seeds) >= 3 and exp.note
  for smoke in (False, True):
    configs = experiment.plan(exp, smoke)
    assert {k.arm for k in configs} == set(exp.arms)
  assert count_params(next(iter(configs.values())).model)['total'] > 0


def test_post_evaluations_apply_to_their_arms_only():
  """The regression of experiment 1: its non-causal evaluation of expert choice is not a
  setting token choice can take, so it applies to the expert-choice arm alone."""
  exp = load('token_vs_expert_choice')
  assert experiment.runner.post_evals_of(exp, 'expert_choice') == ['noncausal_eval']
  assert experiment.runner.post_evals_of(exp, 'token_choice_top2') == []
  exp.post_evals['noncausal_eval'] = PostEval(exp.post_eval('noncausal_eval').overrides)
  with pytest.raises(ConfigError, match="arm 'token_choice_top2', rung 'r0', post-evaluation "
                     "'noncausal_eval': config.model.moe.router.ec_eval='expert_choice': is "
                     "not read by the 'topk' router"):
    experiment.plan(exp)


def test_the_ladders_span_8x_compute_with_5_then_3_seeds():
  from moejax.costs.flops import train_flops
  for name in ('token_vs_expert_choice', 'balancing'):
    exp = load(name)
    assert len(exp.rungs) >= 4 and exp.baseline in exp.arms
    flops = {}
    for key, c in experiment.plan(exp).items():
      flops.setdefault(key.rung, set()).add(train_flops(c))
    assert all(len(v) == 1 for v in flops.values())  # every arm at equal compute
    values = [next(iter(flops[r])) for r in exp.rungs]
    assert values == sorted(values) and values[-1] / values[0] >= 8
    seeds = [len(exp.rung_seeds(r)) for r in exp.rungs]
    assert seeds[:2] == [5, 5] and min(seeds) >= 3


def test_the_tpu_preset_asks_for_a_prepared_corpus():
  exp = load('token_vs_expert_choice', 'tpu')
  c = experiment.run_config(exp, 'expert_threshold', 0, False, 'r3')
  assert c.model.dtype == 'bfloat16' and c.data.source == 'prepared'
  with pytest.raises(ConfigError, match='data.prepared_dir'):
    validate(c, jax.device_count())
  with pytest.raises(ConfigError, match="no preset 'gpu'"):
    experiment.load_experiment('token_vs_expert_choice:gpu')


@pytest.mark.slow  # the runner end to end (six short runs): the integration step
def test_runner_table_plots_no_rerun_and_a_diverged_run(tmp_path, monkeypatch):
  exp = load('bias_rules')
  workdir = str(tmp_path)
  arms = ['aux_1e-2', 'sign_1e-2']
  from moejax.training import loop
  real = loop.train

  def train(c, run_dir):
    if c.seed == 2 and 'sign' in run_dir:
      raise Diverged('step 3: the loss is not finite (a test)')
    return real(c, run_dir)
  monkeypatch.setattr(loop, 'train', train)
  said = []
  results = experiment.run(exp, workdir, smoke=True, arms=arms, seeds=[0, 1, 2], progress=False,
                           log=said.append)
  assert said[0] == ('6 runs (2 arms x their seeds; 6 runs of 4 steps), smoke size: '
                     '0 finished, 6 to train')
  assert said[1].startswith('the first run took ') and 'the 4 left (1 of them compiling)' in said[1]
  assert [len(results[a]) for a in arms] == [3, 3]
  r = json.load(open(os.path.join(workdir, 'sign_1e-2', 'seed_0', 'result.json')))
  assert r['final_step'] == 4 and r['val_loss'] > 0 and r['tokens_per_sec'] > 0
  # The result is the final evaluation (2 batches), not the last periodic one (1 batch).
  rows = [row for row in experiment.runner.read_metrics(
      os.path.join(workdir, 'sign_1e-2', 'seed_0', 'metrics.jsonl')) if 'final/loss' in row]
  assert r['val_loss'] == rows[-1]['final/loss'] != r['periodic_eval_loss']
  assert r['eval_tokens'] == 2 * 8 * 32 and r['val_loss_se'] == rows[-1]['final/loss_se'] > 0
  assert r['train_flops'] > 0
  assert 'diverged' in results['sign_1e-2'][2]
  # Different seeds are different runs.
  assert results[arms[0]][0]['val_loss'] != results[arms[0]][1]['val_loss']
  md = open(os.path.join(workdir, 'results.md')).read()
  assert '| sign_1e-2 | 2 (1 diverged) |' in md and '±' in md and 'smoke' in md
  assert '1 run(s) diverged' in md and 'written at commit ' in md and 'evaluated on 512 tokens' in md
  row = next(line for line in md.splitlines() if line.startswith('| sign_1e-2 | paired | 2 |'))
  assert '| none (smoke size) |' in row and '**' not in row  # 4 steps decide nothing
  for png in ('loss_curves.png', 'bpb_curves.png', 'max_vio.png', 'max_vio_per_layer.png',
              'expert_load.png'):
    assert os.path.getsize(os.path.join(workdir, png)) > 1000 and f']({png})' in md
  # Finished (and diverged) runs are not redone: a second call reads their results.
  monkeypatch.setattr(loop, 'train', lambda *a: pytest.fail('trained again'))
  said.clear()
  again = experiment.run(exp, workdir, smoke=True, arms=arms, seeds=[0, 1, 2], progress=False,
                         log=said.append)
  assert again == results and said == [said[0]] and said[0].endswith('6 finished, 0 to train')


def _results(values: dict, flops=1e9, **extra):
  """{arm: [result per seed]} from {arm: [val loss per seed]}."""
  return {arm: [{'val_loss': v, 'val_bpb': v / np.log(2), 'max_vio_global': 0.3,
                 'train_flops': flops, 'final_step': 10, 'train_tokens': 1000, **extra}
                for v in vs] for arm, vs in values.items()}


def test_the_report_pairs_tests_and_finds_the_trend_of_a_ladder(tmp_path, monkeypatch):
  """Hand-made results (no training): at each rung the 'better' arm is 0.05 below the baseline
  for every seed (+ noise), the 'same' arm 0.0; the 'grows' arm's gap is -0.01, -0.02, -0.04
  at 1e9, 1e10, 1e11 FLOPs: a slope of about -0.015 per decade."""
  from conftest import tiny_config
  base = tiny_config()
  exp = Experiment(name='x', base=base, arms={'base': {}, 'better': {}, 'same': {}, 'grows': {}},
                   seeds=(0, 1, 2, 3, 4), baseline='base', delta=0.02,
                   rungs={'a': Rung({}), 'b': Rung({}), 'c': Rung({})})
  configs = experiment.plan(exp)
  rng = np.random.default_rng(0)
  results = {}
  for rung, flops, grow in (('a', 1e9, -0.01), ('b', 1e10, -0.02), ('c', 1e11, -0.04)):
    b = 3.0 - 0.1 * np.log10(flops) + rng.normal(0, 0.05, 5)
    results[rung] = _results({'base': b, 'better': b - 0.05 + rng.normal(0, 0.002, 5),
                              'same': b + rng.normal(0, 0.002, 5),
                              'grows': b + grow + rng.normal(0, 0.001, 5)}, flops)
  comps = report.comparisons(exp, results['a'], configs, 'a', list(exp.arms))
  assert comps['better'].paired and comps['better'].verdict == 'better'
  assert comps['same'].verdict == 'equivalent'
  from moejax.experiment import plots
  drawn, real_gap = {}, plots.ladder_gap
  monkeypatch.setattr(plots, 'ladder_gap', lambda w, gaps, b: drawn.update(gaps) or real_gap(
      w, gaps, b))
  path = report.write(exp, str(tmp_path), results, configs, smoke=False)
  md = open(path).read()
  # The gap plot's bars are each rung's 95% t-interval, not the interval of a verdict ('same'
  # alone against the baseline is equivalent: its verdict's interval is the 90% one of the two
  # one-sided tests).
  alone = report.comparisons(exp, results['a'], configs, 'a', ['base', 'same'])['same']
  assert alone.verdict == 'equivalent' and alone.level == pytest.approx(0.90)
  _, _, low, high, _ = drawn['same']
  assert (low[0], high[0]) == pytest.approx(alone.interval(0.95))
  assert (low[0], high[0]) != pytest.approx((alone.low, alone.high))
  assert '## The compute ladder' in md and 'ladder_loss.png' in md and 'ladder_gap.png' in md
  ladder_rows = md[md.index('## The compute ladder'):].splitlines()
  row = next(line for line in ladder_rows if line.startswith('| grows | paired |'))
  slope = float(row.split('|')[6].split('[')[0])
  assert slope == pytest.approx(-0.015, abs=0.003) and 'the gap grows' in row
  # Its 95% interval by hand: least squares of the per-seed gaps on log10 FLOPs, slope +- the
  # t quantile (n - 2 degrees of freedom) x its standard error.
  from scipy import stats
  logc, gap = [], []
  for rung, flops in (('a', 1e9), ('b', 1e10), ('c', 1e11)):
    for g, b in zip(results[rung]['grows'], results[rung]['base']):
      logc.append(np.log10(flops))
      gap.append(g['val_loss'] - b['val_loss'])
  fit = stats.linregress(logc, gap)
  half = stats.t.ppf(0.975, len(gap) - 2) * fit.stderr
  lo, hi = (float(v) for v in row.split('|')[6].split('[')[1].split(']')[0].split(','))
  assert (lo, hi) == (pytest.approx(fit.slope - half, abs=1e-4),
                      pytest.approx(fit.slope + half, abs=1e-4))
  row = next(line for line in ladder_rows if line.startswith('| same | paired |'))
  assert 'no trend detected' in row
  assert os.path.getsize(tmp_path / 'ladder_loss.png') > 1000
  # Compute multipliers: 'better' sits 0.05 below a baseline falling 0.1 per decade, so it
  # reaches the baseline's loss with 10^-0.5 = 0.32x the compute, below the ladder at the first
  # rung (extrapolated) and inside it at the last; 'same' needs 1x.
  rows = md[md.index('Compute multipliers'):].splitlines()

  def multiplier_cells(arm):
    cells = next(line for line in rows if line.startswith(f'| {arm} |')).split('|')[2:5]
    return [[float(v.strip(' x[],')) for v in c.split('(')[0].split()] for c in cells], cells
  values, cells = multiplier_cells('better')
  assert all(low < 10 ** -0.5 < high for _, low, high in values)
  assert '(extrapolated)' in cells[0] and '(extrapolated)' not in cells[2]
  values, _ = multiplier_cells('same')
  assert all(0.85 < low < high < 1.15 for _, low, high in values)
  assert 'ladder_multipliers.png' in md and os.path.getsize(tmp_path / 'ladder_multipliers.png')
  sizes = [line for line in rows if line.startswith('| c | ')]
  assert [line.split('|')[2].strip() for line in sizes] == list(exp.arms)
  # At smoke size the same numbers get no verdicts and no trends, and the rungs say the steps
  # their runs did (not only the full experiment's overrides).
  os.makedirs(tmp_path / 'smoke')
  md = open(report.write(exp, str(tmp_path / 'smoke'), results, configs, smoke=True)).read()
  assert md.startswith('# x (smoke size: not a result)')
  assert '**' not in md and md.count('| none (smoke size) |') == 3 * 3 + 3
  assert "- rung `a`: `{}` (these smoke runs: train.steps=6)" in md


def test_plots_keep_their_text_inside_and_name_each_arms_layers(tmp_path, monkeypatch):
  """A long title and y label are wrapped into the figure; the per-layer MaxVio panels each
  have a legend of their own arm's MoE layers (a baseline with a dense first layer beside an
  all-MoE arm)."""
  from moejax.experiment import plots
  plt = plots.pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.2))
  ax.set_ylabel(plots.LOSS_LABEL)
  ax.set_title('router saturation: (token, layer) experts also chosen at the final step')
  fig.tight_layout()
  assert len(plots.outside(fig)) == 2  # both cut as drawn before
  plots.fit_texts(fig)
  assert plots.outside(fig) == []
  plt.close(fig)
  for arm, layers in (('base', 3), ('all_moe', 4)):
    os.makedirs(tmp_path / arm / 'seed_0')
    with open(tmp_path / arm / 'seed_0' / 'metrics.jsonl', 'w') as f:
      for step in (1, 2, 3):
        f.write(json.dumps({'step': step, 'moe/per_layer/max_vio': [0.1 * step] * layers}) + '\n')
  figs = []
  monkeypatch.setattr(plots, '_save', lambda plt, fig, *a, **k: figs.append(fig) or 'x.png')
  plots.per_layer_vio(str(tmp_path), ['base', 'all_moe'], [0],
                      {'base': [1, 2, 3], 'all_moe': [0, 1, 2, 3]})
  assert [[t.get_text() for t in ax.get_legend().get_texts()] for ax in figs[0].axes] == [
      ['layer 1', 'layer 2', 'layer 3'], ['layer 0', 'layer 1', 'layer 2', 'layer 3']]


def test_arms_that_cannot_pair_are_compared_unpaired():
  from conftest import tiny_config
  exp = Experiment(name='x', base=tiny_config(), seeds=(0, 1, 2), baseline='base',
                   arms={'base': {}, 'wider': {'model.moe.expert_ffn_dim': 32}})
  configs = experiment.plan(exp)
  results = {None: _results({'base': [2.0, 2.1, 2.2], 'wider': [1.9, 2.0, 2.1]})}
  assert not report.pairable(configs, None, 'wider', 'base')
  comps = report.comparisons(exp, results[None], configs, None, ['base', 'wider'])
  assert not comps['wider'].paired


def test_the_plan_and_the_estimate_are_said_before_and_after_the_first_runs():
  """The ladder of token_vs_expert_choice: 48 runs in 4 rungs (5, 5, 3, 3 seeds of 3 arms) of
  their own steps. The estimate, after the first two runs (seeds of one config): the first
  compiled (its extra time is the compile), the second did the work; each run left costs that
  work scaled by its training FLOPs, plus a compile if its config has none yet (11 cells)."""
  from moejax.costs.flops import train_flops
  exp = load('token_vs_expert_choice')
  configs = experiment.plan(exp)
  line = experiment.runner.plan_line(exp, configs, list(configs)[5:], smoke=False)
  assert line == ('48 runs (3 arms x 4 rungs x their seeds; r0: 15 runs of 150 steps, r1: 15 '
                  'runs of 200 steps, r2: 9 runs of 280 steps, r3: 9 runs of 380 steps): '
                  '5 finished, 43 to train')
  todo = list(configs)
  assert experiment.runner._estimate(configs, todo, [50.0]) == ''  # wait for the second
  said = experiment.runner._estimate(configs, todo, [50.0, 20.0])
  first = configs[todo[0]]
  want = sum(20.0 * train_flops(configs[k]) / train_flops(first) for k in todo[2:]) + 11 * 30.0
  assert f'the 46 left (11 of them compiling) would take about {want / 60:.1f} min' in said
  # One seed per config: the first run alone, as an upper estimate.
  one = {k: c for k, c in configs.items() if k.seed == 0}
  said = experiment.runner._estimate(one, list(one), [50.0])
  want = sum(50.0 * train_flops(c) / train_flops(first) for c in list(one.values())[1:])
  assert f'the 11 left would take at most about {want / 60:.1f} min' in said


def test_column_functions_hand_cases():
  from moejax.experiments.metrics import steps_to_balance, tail_mean
  rows = [{'step': s, 'moe/per_layer/max_vio': v} for s, v in
          [(10, [0.9, 0.4]), (20, [0.4, 0.6]), (30, [0.3, 0.2]), (40, [0.6, 0.1])]]
  # layer 0 goes back above 0.5 at step 40: never settles; layer 1 settles from step 30
  assert steps_to_balance(0.5)(rows, None) == [math.inf, 30.0]
  # The report says 'never' for a layer no seed settled, and how many never did otherwise.
  assert report._fmt([[math.inf, 30.0], [math.inf, 20.0]]) == 'never / 25.000 ± 7.071'
  assert report._fmt([20.0, math.inf, 40.0]) == '30.000 ± 14.142 (1 of 3 never)'
  assert tail_mean('moe/per_layer/max_vio', 2)(rows, None) == pytest.approx([0.45, 0.15])
  flops = experiment.load_module(str(EXPERIMENTS / 'capacity_factor.py'))
  c = experiment.run_config(flops.get_experiment(), 'cf_1.25', 0, smoke=False)
  # T = 16 x 64 = 1024, K = 2, N = 8: C = ceil(1.25 * 2 * 1024 / 8) = 320; 8 * 320 / 2048
  assert flops.expert_flops_vs_dropless([], c) == 1.25


def test_bad_arm_and_override_are_refused(tmp_path):
  exp = load('bias_rules')
  with pytest.raises(ConfigError, match="no arm 'nope'"):
    experiment.run(exp, str(tmp_path), smoke=True, arms=['nope'], progress=False)
  exp.arms['typo'] = {'model.moe.balance.aux_weight': 1.0}
  with pytest.raises(ConfigError, match='aux_weight'):
    experiment.run(exp, str(tmp_path), smoke=True, arms=['typo'], progress=False)
  with pytest.raises(ConfigError, match="--rungs: no rung 'r9'"):
    experiment.plan(load('balancing'), rungs=['r9'])
  assert not os.listdir(tmp_path)  # refused before anything was written


def test_each_run_is_its_own_wandb_run_grouped_by_experiment():
  from conftest import tiny_config
  base = tiny_config()
  exp = Experiment(name='x', base=base, arms={'a': {}}, rungs={'r0': Rung({})})
  assert experiment.run_config(exp, 'a', 1, False, 'r0').train.wandb_name == ''  # W&B off
  base.train.wandb_project = 'p'
  c = experiment.run_config(exp, 'a', 1, False, 'r0')
  assert (c.train.wandb_name, c.train.wandb_group) == ('r0/a/seed_1', 'x')
  base.train.wandb_group = 'sweep-3'  # the user's own group wins
  assert experiment.run_config(exp, 'a', 2, False).train.wandb_group == 'sweep-3'
  assert experiment.run_config(exp, 'a', 2, False).train.wandb_name == 'a/seed_2'
