"""The experiment runner: named arms (config overrides) x seeds, each a normal training run,
then a table and plots (report.py).

An experiment file defines `get_experiment() -> Experiment`. Every (arm, seed) trains in
DIR/ARM/seed_S with `training.loop.train`; a run that finished has DIR/ARM/seed_S/result.json
and is not redone, an interrupted one resumes from its last checkpoint. At the end DIR/results.md
holds the table (mean +/- std over seeds) and DIR/*.png the plots (moejax/experiment/report.py).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from moejax import checks, cli
from moejax.config import set_fields
from moejax.errors import ConfigError
from moejax.training.metrics import read_metrics


@dataclasses.dataclass
class Arm:
  """One setting under comparison: dotted config overrides, e.g. {'model.moe.num_experts': 16}.
  `upcycle_from` names an arm whose checkpoint at `upcycle_at` x train.steps (same seed) this
  arm starts from, converted to MoE by moejax.upcycle (that arm must checkpoint there)."""
  overrides: dict
  upcycle_from: str = ''
  upcycle_at: float = 0.5
  upcycle_mode: str = 'copy'


@dataclasses.dataclass
class Experiment:
  name: str
  base: Any  # ml_collections.ConfigDict shared by every arm
  arms: dict  # arm name -> Arm or a dict of overrides
  seeds: tuple = (0, 1, 2)
  # Extra columns: name -> fn(metric rows of one run, its config) -> number or list per layer.
  columns: dict = dataclasses.field(default_factory=dict)
  # Evaluate each finished run again under config overrides: name -> overrides; the column
  # '<name>/loss' holds the result (e.g. expert choice evaluated non-causally).
  post_evals: dict = dataclasses.field(default_factory=dict)
  smoke: dict = dataclasses.field(default_factory=dict)  # overrides for --smoke
  note: str = ''  # what the literature found (markdown)
  # An arm every other arm is compared with: the report gives each difference of means and its
  # 95% bootstrap interval over seeds, and whether it excludes 0 (report.compare).
  baseline: str = ''

  def arm(self, name: str) -> Arm:
    a = self.arms[name]
    return a if isinstance(a, Arm) else Arm(dict(a))


def load_module(path: str):
  """An experiment (or any Python) file by path."""
  return cli.load_module(path, what='experiment')


def experiment_path(spec: str) -> str:
  """'experiments/x.py' or the name of a shipped experiment ('balancing')."""
  return cli.shipped_path(spec, 'moejax.experiments', 'experiment', ('common.py', 'metrics.py'))


def load_experiment(spec: str) -> 'Experiment':
  module = load_module(experiment_path(spec))
  if not hasattr(module, 'get_experiment'):
    raise ConfigError(f'experiment {spec!r}: the file defines no get_experiment()')
  return module.get_experiment()


def override_base(exp: 'Experiment', overrides: list) -> 'Experiment':
  """--config.x=v on the command line: set on the base every arm shares. A field an arm
  varies cannot be overridden (the comparison would silently change)."""
  for key, _ in overrides:
    for name in exp.arms:
      if key in exp.arm(name).overrides:
        raise ConfigError(
            f'--config.{key}: arm {name!r} sets this field (it is what the experiment compares); '
            'drop the override, or choose arms with --arms')
  cli.apply_overrides(exp.base, overrides)
  return exp


def run_config(exp: Experiment, arm: str, seed: int, smoke: bool):
  c = copy.deepcopy(exp.base)
  set_fields(c, exp.arm(arm).overrides)
  if smoke:
    set_fields(c, exp.smoke)
  c.seed = seed
  c.train.progress = False  # one bar over the runs instead
  return c


def summarize_run(rows: list[dict], config, exp: Experiment, post: dict) -> dict:
  evals = [r for r in rows if 'eval/loss' in r]
  speeds = [r['perf/tokens_per_sec'] for r in rows if 'perf/tokens_per_sec' in r][1:]  # compile
  last = evals[-1] if evals else {}
  out = {'final_step': rows[-1]['step'] if rows else 0,
         'val_loss': last.get('eval/loss'),
         'val_bpb': last.get('eval/bpb'),
         'max_vio_global': last.get('eval/max_vio_global'),
         'dropped_fraction': last.get('eval/dropped_fraction'),
         'tokens_per_sec': float(np.median(speeds)) if speeds else None}
  for name, fn in exp.columns.items():
    out[name] = fn(rows, config)
  out.update(post)
  return out


def post_evaluate(config, run_dir: str, overrides: dict) -> float:
  """Evaluation loss of the run's last checkpoint under overridden (eval-time) settings."""
  from moejax.data import pipeline
  from moejax.training import workdir
  from moejax.training.loop import eval_sets, evaluate_all
  run, _, state = workdir.load(run_dir, config=config, overrides=overrides)
  c = run.config
  splits = pipeline.load_splits(c.data, c.seed)
  sets = eval_sets(splits, c.train.batch_size, c.train.eval_batches)
  return evaluate_all(run.trainer, state, sets, splits.val_weights)['eval/loss']


def run(exp: Experiment, workdir: str, smoke: bool = False, arms=None, seeds=None,
        progress: bool = True) -> dict:
  """Run every missing (arm, seed), then write the report. Returns {arm: [result per seed]}."""
  from moejax.training.loop import train
  from moejax.upcycle import upcycle
  arms = list(arms or exp.arms)
  seeds = list(seeds if seeds is not None else exp.seeds)
  for name in arms:
    if name not in exp.arms:
      raise ConfigError(f'--arms: no arm {name!r}; the experiment has '
                                   f'{list(exp.arms)}')
    src = exp.arm(name).upcycle_from
    if src and src not in arms:
      arms.insert(arms.index(name), src)  # its source must run first
  # Check every run's config before the first compile.
  configs = {(a, s): run_config(exp, a, s, smoke) for a in arms for s in seeds}
  for c in configs.values():
    checks.validate(c, jax.device_count())
  os.makedirs(workdir, exist_ok=True)
  if not jax.config.jax_compilation_cache_dir:
    # Seeds of one arm compile the same programs: compile once, reuse from disk.
    jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, '.jax_cache'))
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(configs), desc=exp.name, unit='run', dynamic_ncols=True)
  results = {}
  for (arm, seed), c in configs.items():
    run_dir = os.path.join(workdir, arm, f'seed_{seed}')
    result_path = os.path.join(run_dir, 'result.json')
    if bar is not None:
      bar.set_postfix_str(f'{arm} seed {seed}')
    if not os.path.exists(result_path):
      spec = exp.arm(arm)
      if spec.upcycle_from and not os.path.isdir(os.path.join(run_dir, 'checkpoints')):
        source = os.path.join(workdir, spec.upcycle_from, f'seed_{seed}')
        upcycle(c, source, run_dir, spec.upcycle_mode, int(spec.upcycle_at * c.train.steps))
      train(c, run_dir)
      post = {f'{n}/loss': post_evaluate(c, run_dir, o) for n, o in exp.post_evals.items()}
      summary = summarize_run(read_metrics(os.path.join(run_dir, 'metrics.jsonl')), c, exp,
                              post)
      tmp = result_path + '.tmp'
      with open(tmp, 'w') as f:
        json.dump(summary, f)
      os.replace(tmp, result_path)  # a result exists only for a finished run
    with open(result_path) as f:
      results.setdefault(arm, []).append(json.load(f))
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  from moejax.experiment import report
  report.write(exp, workdir, results, arms, seeds, smoke)
  return results
