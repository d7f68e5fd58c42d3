"""Shipped experiments end to end at smoke size (one seed, a few steps), for the experiments
with a path of their own: post-evaluations (expert choice evaluated non-causally), upcycling
between arms. test_experiments.py runs the balancing experiment, validates and traces every
arm of every experiment, and checks the column functions by hand; the other experiments
differ from these only in config values and column functions (compile time is what a smoke
run costs, so the default test run does not repeat it for each)."""
import os
import pathlib

import pytest

from moejax import experiment
from moejax.config import ConfigError
from moejax.upcycle import upcycle

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / 'experiments'
ARMS = {  # balancing runs in test_experiments.py
    'token_vs_expert_choice': ['expert_choice_batch'],
    'upcycling': ['upcycled_copy'],  # pulls in its source arm 'dense'
}


@pytest.mark.parametrize('name', list(ARMS))
def test_experiment_smoke(name, tmp_path):
  exp = experiment.load_module(str(EXPERIMENTS / f'{name}.py')).get_experiment()
  results = experiment.run(exp, str(tmp_path), smoke=True, arms=ARMS[name], seeds=[0],
                           progress=False)
  md = open(tmp_path / 'results.md').read()
  for arm in results:
    assert f'| {arm} |' in md and results[arm][0]['val_loss'] > 0
  for column in exp.columns:
    assert all(results[a][0][column] is not None for a in results), column
  if name == 'token_vs_expert_choice':  # evaluated causally (top-K) and as trained
    ec = results['expert_choice_batch'][0]
    assert ec['noncausal_eval/loss'] > 0 and ec['noncausal_eval/loss'] != ec['val_loss']
  if name == 'upcycling':
    assert list(results) == ['dense', 'upcycled_copy']
    run_dir = tmp_path / 'upcycled_copy' / 'seed_0'
    assert os.path.exists(run_dir / 'upcycled_from.json')
    before = sorted(os.listdir(run_dir / 'checkpoints'))
    c = experiment.run_config(exp, 'upcycled_copy', 0, smoke=True)
    with pytest.raises(ConfigError, match='already holds checkpoints'):
      upcycle(c, str(tmp_path / 'dense' / 'seed_0'), str(run_dir))
    assert sorted(os.listdir(run_dir / 'checkpoints')) == before
