"""Every arm of every shipped experiment end to end at smoke size (one seed, a few steps; for a
compute ladder its first rung): post-evaluations (expert choice evaluated non-causally, on its
arm only), per-layer columns, upcycling between arms, the downstream task, the report. Marked `slow`: `.ci/run`
runs them as a second step (python -m pytest -n 2 --dist loadfile -m slow). The default run
validates every run and post-evaluation config of every experiment and runs the runner on one
experiment (test_experiments.py)."""
import os
import pathlib
import pickle
import subprocess
import sys

import pytest

from moejax import experiment
from moejax.config import ConfigError
from moejax.upcycle import upcycle

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / 'experiments'
NAMES = ['token_vs_expert_choice', 'balancing', 'balance_by_depth', 'router_families',
         'capacity_factor', 'granularity', 'upcycling', 'bias_rules', 'dynamic_compute']


@pytest.mark.slow
@pytest.mark.parametrize('name', NAMES)
def test_experiment_smoke(name, tmp_path):
  exp = experiment.load_module(str(EXPERIMENTS / f'{name}.py')).get_experiment()
  rungs = list(exp.rungs)[:1] or None
  results = _run_in_fresh_process(name, tmp_path, rungs)
  if rungs:
    results = results[rungs[0]]
  assert set(results) == set(exp.arms)
  md = open(tmp_path / 'results.md').read()
  for arm in results:
    assert f'| {arm} |' in md and results[arm][0]['val_loss'] > 0
  for column in exp.columns:
    assert all(results[a][0][column] is not None for a in results), column
  for task in exp.tasks.names:  # every run scored on the task's first smoke_limit documents
    assert all(results[a][0][f'task/{task}/documents'] == exp.tasks.smoke_limit and
               0 <= results[a][0][f'task/{task}/{exp.tasks.metric}'] <= 1 for a in results)
    assert f'| {task} {exp.tasks.metric} |' in md
  if name == 'token_vs_expert_choice':  # evaluated causally (top-K) and as trained
    ec = results['expert_choice'][0]
    assert ec['noncausal_eval/loss'] > 0 and ec['noncausal_eval/loss'] != ec['val_loss']
    assert 'noncausal_eval/loss' not in results['token_choice_top2'][0]
  if name == 'capacity_factor':  # half the slots top-2 needs: at least ~half the copies drop
    assert results['cf_0.5'][0]['dropped_fraction'] > 0.4
    assert results['cf_0.5'][0]['expert FLOPs vs dropless'] == pytest.approx(0.5)
  if name == 'balance_by_depth':  # one value per MoE layer (all 4 layers are MoE)
    assert len(results['all_moe'][0]['final MaxVio per layer']) == 4
  if name == 'upcycling':
    assert list(results)[:2] == ['dense', 'upcycled_copy']
    run_dir = tmp_path / 'upcycled_copy' / 'seed_0'
    assert os.path.exists(run_dir / 'upcycled_from.json')
    before = sorted(os.listdir(run_dir / 'checkpoints'))
    c = experiment.run_config(exp, 'upcycled_copy', 0, smoke=True)
    with pytest.raises(ConfigError, match='already holds checkpoints'):
      upcycle(c, str(tmp_path / 'dense' / 'seed_0'), str(run_dir))
    assert sorted(os.listdir(run_dir / 'checkpoints')) == before


_CHILD = """
import pickle, sys
from moejax import experiment
path, workdir, rungs, out = sys.argv[1:5]
exp = experiment.load_module(path).get_experiment()
results = experiment.run(exp, workdir, smoke=True, seeds=[0], progress=False,
                         rungs=rungs.split(',') if rungs else None)
pickle.dump(results, open(out, 'wb'))
"""


def _run_in_fresh_process(name, tmp_path, rungs):
  """experiment.run(smoke, seed 0, these rungs) of experiments/NAME.py in a new interpreter
  (the test session's XLA_FLAGS and JAX_PLATFORMS); returns its results."""
  out = tmp_path.parent / f'{tmp_path.name}.results.pickle'
  done = subprocess.run(
      [sys.executable, '-c', _CHILD, str(EXPERIMENTS / f'{name}.py'), str(tmp_path),
       ','.join(rungs or []), str(out)], capture_output=True, text=True, env=dict(os.environ))
  assert done.returncode == 0, done.stderr[-6000:]
  return pickle.load(open(out, 'rb'))
