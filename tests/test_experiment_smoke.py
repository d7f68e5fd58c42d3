"""Every shipped experiment end to end at smoke size (one seed, a few steps, one arm each:
compile time is what a smoke run costs): post-evaluations (expert choice evaluated
non-causally), per-layer columns, upcycling between arms. Marked `slow`: `.ci/run` runs them
as a second step (python -m pytest -n 2 --dist loadfile -m slow). The default run keeps the
balancing experiment (test_experiments.py), which also validates and traces every arm of
every experiment and checks the column functions by hand."""
import os
import pathlib

import pytest

from moejax import experiment
from moejax.config import ConfigError
from moejax.upcycle import upcycle

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / 'experiments'
ARMS = {  # balancing runs in test_experiments.py (default run)
    'token_vs_expert_choice': ['expert_choice_batch'],
    'balance_by_depth': ['all_moe'],
    'router_families': ['deepseekmoe'],  # shared expert + 31 routed experts
    'capacity_factor': ['cf_0.5'],
    'granularity': ['32x32_top8'],  # the finest experts
    'upcycling': ['upcycled_copy'],  # pulls in its source arm 'dense'
    'bias_rules': ['quantile_0.5', 'damped_1e-2'],
    'dynamic_compute': ['null_experts', 'top_p', 'relu'],
}


@pytest.mark.slow
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
  if name == 'capacity_factor':  # half the slots top-2 needs: at least ~half the copies drop
    assert results['cf_0.5'][0]['dropped_fraction'] > 0.4
    assert results['cf_0.5'][0]['expert FLOPs vs dropless'] == pytest.approx(0.5)
  if name == 'balance_by_depth':  # one value per MoE layer (all 4 layers are MoE)
    assert len(results['all_moe'][0]['final MaxVio per layer']) == 4
  if name == 'upcycling':
    assert list(results) == ['dense', 'upcycled_copy']
    run_dir = tmp_path / 'upcycled_copy' / 'seed_0'
    assert os.path.exists(run_dir / 'upcycled_from.json')
    before = sorted(os.listdir(run_dir / 'checkpoints'))
    c = experiment.run_config(exp, 'upcycled_copy', 0, smoke=True)
    with pytest.raises(ConfigError, match='already holds checkpoints'):
      upcycle(c, str(tmp_path / 'dense' / 'seed_0'), str(run_dir))
    assert sorted(os.listdir(run_dir / 'checkpoints')) == before
