"""The experiment runner (moejax/experiment.py, moejax/report.py) and the experiment files."""
import json
import os
import pathlib

import jax
import pytest

from moejax import experiment
from moejax.checks import validate
from moejax.errors import ConfigError
from moejax.costs.parameters import count_params

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / 'experiments'
NAMES = ['token_vs_expert_choice', 'balancing', 'balance_by_depth', 'router_families',
         'capacity_factor', 'granularity', 'upcycling', 'bias_rules', 'dynamic_compute']


def load(name):
  return experiment.load_module(str(EXPERIMENTS / f'{name}.py')).get_experiment()


@pytest.mark.parametrize('name', NAMES)
def test_every_arm_builds(name):
  """Every arm's full-size and smoke config validates and its model traces (no compile)."""
  exp = load(name)
  assert len(exp.seeds) >= 3 and exp.note
  for arm in exp.arms:
    for smoke in (False, True):
      c = experiment.run_config(exp, arm, exp.seeds[0], smoke)
      validate(c, jax.device_count())
    assert count_params(c.model)['total'] > 0


def test_runner_table_plots_and_no_rerun(tmp_path, monkeypatch):
  exp = load('balancing')
  workdir = str(tmp_path)
  arms = ['loss_free_1e-2']  # one arm, two seeds (the smoke tests cover tables of several arms)
  results = experiment.run(exp, workdir, smoke=True, arms=arms, seeds=[0, 1], progress=False)
  assert [len(results[a]) for a in arms] == [2]
  for arm in arms:
    for s in (0, 1):
      r = json.load(open(os.path.join(workdir, arm, f'seed_{s}', 'result.json')))
      assert r['final_step'] == 4 and r['val_loss'] > 0 and r['tokens_per_sec'] > 0
      assert 0 <= r['max_vio_global'] and r['MaxVio batch (last 5 logs)'] is not None
  # Different seeds are different runs.
  assert results[arms[0]][0]['val_loss'] != results[arms[0]][1]['val_loss']
  md = open(os.path.join(workdir, 'results.md')).read()
  assert '| loss_free_1e-2 |' in md and '±' in md and 'smoke' in md
  for png in ('loss_curves.png', 'bpb_curves.png', 'max_vio.png', 'max_vio_per_layer.png',
              'expert_load.png'):
    assert os.path.getsize(os.path.join(workdir, png)) > 1000 and f']({png})' in md
  # Finished runs are not redone: a second call reads their results without training.
  monkeypatch.setattr('moejax.training.loop.train', lambda *a: pytest.fail('trained again'))
  again = experiment.run(exp, workdir, smoke=True, arms=arms, seeds=[0, 1], progress=False)
  assert again == results


def test_column_functions_hand_cases():
  import sys
  sys.path.insert(0, str(EXPERIMENTS))
  from metrics import steps_to_balance, tail_mean
  rows = [{'step': s, 'moe/per_layer/max_vio': v} for s, v in
          [(10, [0.9, 0.4]), (20, [0.4, 0.6]), (30, [0.3, 0.2]), (40, [0.6, 0.1])]]
  # layer 0 goes back above 0.5 at step 40: never settles (41); layer 1 settles from step 30
  assert steps_to_balance(0.5)(rows, None) == [41.0, 30.0]
  assert tail_mean('moe/per_layer/max_vio', 2)(rows, None) == pytest.approx([0.45, 0.15])
  flops = experiment.load_module(str(EXPERIMENTS / 'capacity_factor.py'))
  c = experiment.run_config(flops.get_experiment(), 'cf_1.25', 0, smoke=False)
  # T = 16 x 64 = 1024, K = 2, N = 8: C = ceil(1.25 * 2 * 1024 / 8) = 320; 8 * 320 / 2048
  assert flops.expert_flops_vs_dropless([], c) == 1.25


def test_bad_arm_and_override_are_refused(tmp_path):
  exp = load('balancing')
  with pytest.raises(ConfigError, match="no arm 'nope'"):
    experiment.run(exp, str(tmp_path), smoke=True, arms=['nope'], progress=False)
  exp.arms['typo'] = {'model.moe.balance.aux_weight': 1.0}
  with pytest.raises(ConfigError, match='aux_weight'):
    experiment.run(exp, str(tmp_path), smoke=True, arms=['typo'], progress=False)
  assert not os.listdir(tmp_path)  # refused before anything was written
