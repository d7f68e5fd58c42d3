"""The experiment runner (moejax/experiment.py, moejax/report.py) and the experiment files."""
import json
import os
import pathlib

import jax
import pytest

from moejax import experiment
from moejax.config import ConfigError, validate
from moejax.params import count_params

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / 'experiments'
NAMES = ['token_vs_expert_choice', 'balancing', 'balance_by_depth', 'router_families',
         'capacity_factor', 'granularity', 'upcycling']


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
  arms = ['none', 'loss_free_1e-2']
  results = experiment.run(exp, workdir, smoke=True, arms=arms, seeds=[0, 1], progress=False)
  assert [len(results[a]) for a in arms] == [2, 2]
  for arm in arms:
    for s in (0, 1):
      r = json.load(open(os.path.join(workdir, arm, f'seed_{s}', 'result.json')))
      assert r['final_step'] == 4 and r['val_loss'] > 0 and r['tokens_per_sec'] > 0
      assert 0 <= r['max_vio_global'] and r['MaxVio batch (last 5 logs)'] is not None
  # Different seeds are different runs.
  assert results['none'][0]['val_loss'] != results['none'][1]['val_loss']
  md = open(os.path.join(workdir, 'results.md')).read()
  assert '| none |' in md and '| loss_free_1e-2 |' in md and '±' in md and 'smoke' in md
  for png in ('loss_curves.png', 'max_vio.png', 'max_vio_per_layer.png', 'expert_load.png'):
    assert os.path.getsize(os.path.join(workdir, png)) > 1000 and f']({png})' in md
  # Finished runs are not redone: a second call reads their results without training.
  monkeypatch.setattr('moejax.training.loop.train', lambda *a: pytest.fail('trained again'))
  again = experiment.run(exp, workdir, smoke=True, arms=arms, seeds=[0, 1], progress=False)
  assert again == results


def test_bad_arm_and_override_are_refused(tmp_path):
  exp = load('balancing')
  with pytest.raises(ConfigError, match="no arm 'nope'"):
    experiment.run(exp, str(tmp_path), smoke=True, arms=['nope'], progress=False)
  exp.arms['typo'] = {'model.moe.balance.aux_weight': 1.0}
  with pytest.raises(ConfigError, match='aux_weight'):
    experiment.run(exp, str(tmp_path), smoke=True, arms=['typo'], progress=False)
  assert not os.listdir(tmp_path)  # refused before anything was written
