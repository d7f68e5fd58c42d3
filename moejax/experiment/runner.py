"""The experiment runner: named arms (config overrides) x seeds, optionally x rungs of a compute
ladder, each a normal training run; then the report (report.py).

An experiment file defines `get_experiment()` (or `get_experiment(arg)` for `NAME:arg`, e.g. an
accelerator-sized preset) returning an `Experiment`. Every run trains in DIR/ARM/seed_S (with
rungs, DIR/RUNG/ARM/seed_S) with `training.loop.train`; a run that finished has a result.json
there and is not redone, an interrupted one resumes from its last checkpoint, and a run that
diverged is a result of its arm (reported and counted, not an abort of the experiment). Every
run's config, and its post-evaluation configs, are validated before anything trains.
"""
from __future__ import annotations

import collections
import copy
import json
import math
import os
import sys
import time
from functools import partial

import jax
import numpy as np

from moejax import checks, cli
from moejax.config import set_fields
from moejax.errors import ConfigError, Diverged
from moejax.experiment.spec import Arm, Experiment, PostEval, Rung, RunKey, Tasks  # noqa: F401
from moejax.training.metrics import read_metrics, write_json

def load_module(path: str):
  """An experiment (or any Python) file by path."""
  return cli.load_module(path, what='experiment')


def experiment_path(spec: str) -> str:
  """'experiments/x.py' or the name of a shipped experiment ('balancing')."""
  return cli.shipped_path(spec, 'moejax.experiments', 'experiment', SHARED_FILES)


SHARED_FILES = ('common.py', 'metrics.py')  # shipped next to the experiments, not experiments


def load_experiment(spec: str) -> 'Experiment':
  """'NAME[:ARG]' or 'path.py[:ARG]' -> the Experiment its get_experiment([ARG]) returns."""
  path, _, arg = spec.partition(':')
  module = load_module(experiment_path(path))
  if not hasattr(module, 'get_experiment'):
    raise ConfigError(f'experiment {spec!r}: the file defines no get_experiment()')
  try:
    return module.get_experiment(arg) if arg else module.get_experiment()
  except TypeError as e:
    if arg and 'positional argument' in str(e):
      raise ConfigError(f'experiment {spec!r}: it takes no argument; drop ":{arg}"') from None
    raise
  except ValueError as e:
    raise ConfigError(f'experiment {spec!r}: {e}') from None


def override_base(exp: 'Experiment', overrides: list) -> 'Experiment':
  """--config.x=v on the command line: set on the base every arm shares. A field an arm or a
  rung varies cannot be overridden (the comparison would silently change)."""
  for key, _ in overrides:
    for name in exp.arms:
      if key in exp.arm(name).overrides:
        raise ConfigError(
            f'--config.{key}: arm {name!r} sets this field (it is what the experiment compares); '
            'drop the override, or choose arms with --arms')
    for name in exp.rungs:
      if key in exp.rung(name).overrides:
        raise ConfigError(f'--config.{key}: rung {name!r} sets this field (the ladder varies '
                          'it); drop the override, or choose rungs with --rungs')
  cli.apply_overrides(exp.base, overrides)
  return exp


def run_config(exp: Experiment, arm: str, seed: int, smoke: bool, rung: str | None = None):
  """The config of one run: base, then the rung's overrides, the arm's, the smoke settings."""
  c = copy.deepcopy(exp.base)
  if rung:
    rung_fields = exp.rung(rung).overrides
    clash = sorted(set(rung_fields) & set(exp.arm(arm).overrides))
    if clash:
      raise ConfigError(f'experiment {exp.name!r}: rung {rung!r} and arm {arm!r} both set '
                        f'{clash[0]}; a ladder varies scale, arms what is compared')
    set_fields(c, rung_fields)
  set_fields(c, exp.arm(arm).overrides)
  if smoke:
    set_fields(c, exp.smoke)
  c.seed = seed
  c.train.progress = False  # one bar over the runs instead
  if c.train.wandb_project:  # a W&B run per run, grouped by experiment
    c.train.wandb_name = RunKey(rung, arm, seed).dir('').strip(os.sep)
    c.train.wandb_group = c.train.wandb_group or exp.name
  return c


def post_eval_config(exp: Experiment, name: str, config):
  """A run's config under a post-evaluation's overrides."""
  return set_fields(copy.deepcopy(config), exp.post_eval(name).overrides)


def post_evals_of(exp: Experiment, arm: str) -> list[str]:
  """The post-evaluations that apply to an arm."""
  return [n for n in exp.post_evals if exp.post_eval(n).arms is None or
          arm in exp.post_eval(n).arms]


def plan(exp: Experiment, smoke: bool = False, arms=None, seeds=None, rungs=None) -> dict:
  """{RunKey: config} of every run asked for, in the order they run; every config and every
  post-evaluation config validated first (a ConfigError names the run)."""
  arms = list(arms or exp.arms)
  for name in arms:
    if name not in exp.arms:
      raise ConfigError(f'--arms: no arm {name!r}; the experiment has {list(exp.arms)}')
    src = exp.arm(name).upcycle_from
    if src and src not in arms:
      arms.insert(arms.index(name), src)  # its source must run first
  for name in exp.post_evals:
    unknown = [a for a in (exp.post_eval(name).arms or ()) if a not in exp.arms]
    if unknown:
      raise ConfigError(f'experiment {exp.name!r}: post-evaluation {name!r} names no arm '
                        f'{unknown[0]!r}')
  rung_names = list(rungs or exp.rungs) or [None]
  for name in rung_names:
    if name is not None and name not in exp.rungs:
      raise ConfigError(f'--rungs: no rung {name!r}; the experiment has {list(exp.rungs)}')
  configs = {}
  for rung in rung_names:
    run_seeds = list(exp.rung_seeds(rung)) if seeds is None else [
        s for s in seeds if s in exp.rung_seeds(rung)] or list(seeds)
    for arm in arms:
      for seed in run_seeds:
        key = RunKey(rung, arm, seed)
        c = run_config(exp, arm, seed, smoke, rung)
        _validate(c, key)
        for post in post_evals_of(exp, arm):
          _validate(post_eval_config(exp, post, c), key, post)
        configs[key] = c
  return configs


def _validate(config, key: RunKey, post: str = ''):
  try:
    checks.validate(config, jax.device_count())
  except ConfigError as e:
    where = f'arm {key.arm!r}' + (f', rung {key.rung!r}' if key.rung else '') + (
        f', post-evaluation {post!r}' if post else '')
    raise ConfigError(f'{where}: {e}') from None


def summarize_run(rows: list[dict], config, exp: Experiment, post: dict) -> dict:
  """result.json of a finished run: the final evaluation (the whole validation split when
  train.final_eval_batches is 0), its standard error and coverage, the last periodic
  evaluation, training FLOPs and throughput, the experiment's own columns."""
  from moejax.costs.flops import train_flops
  evals = [r for r in rows if 'eval/loss' in r]
  last = evals[-1] if evals else {}
  src = 'final' if 'final/loss' in last else 'eval'
  t = config.train
  out = {'final_step': rows[-1]['step'] if rows else 0,
         'val_loss': last.get(f'{src}/loss'),
         'val_loss_se': last.get(f'{src}/loss_se'),
         'val_bpb': last.get(f'{src}/bpb'),
         'eval_tokens': last.get(f'{src}/tokens'),
         'eval_sequences': last.get(f'{src}/sequences'),
         'max_vio_global': last.get(f'{src}/max_vio_global'),
         'dropped_fraction': last.get(f'{src}/dropped_fraction'),
         'active_experts': last.get(f'{src}/active_experts'),
         'periodic_eval_loss': last.get('eval/loss'),
         'tokens_per_sec': _median(rows, 'perf/tokens_per_sec'),
         'tflops_per_device': _median(rows, 'perf/tflops_per_device'),
         'mfu': _median(rows, 'perf/mfu'),
         'train_tokens': t.steps * t.batch_size * config.data.seq_len,
         'train_flops': train_flops(config)}
  for name, fn in exp.columns.items():
    out[name] = fn(rows, config)
  out.update(post)
  return out


def _median(rows, key):
  """The median of a logged value after the first (compiling) interval, or None."""
  values = [r[key] for r in rows if key in r][1:]
  return float(np.median(values)) if values else None


def post_evaluate(config, run_dir: str, overrides: dict) -> float:
  """Loss of the run's last checkpoint under overridden (eval-time) settings, on the same
  evaluation as its result: train.final_eval_batches (the whole split at 0), else the
  periodic sample."""
  from moejax.data import pipeline
  from moejax.training import workdir
  from moejax.training.loop import eval_sets, evaluate_all
  run, _, state = workdir.load(run_dir, config=config, overrides=overrides)
  c = run.config
  splits = pipeline.load_splits(c.data, c.seed)
  batches = c.train.final_eval_batches if c.train.final_eval_batches >= 0 else (
      c.train.eval_batches)
  sets = eval_sets(splits, c.train.batch_size, batches)
  return evaluate_all(run.trainer, state, sets, splits.val_weights)['eval/loss']


def plan_line(exp: Experiment, configs: dict, todo: list, smoke: bool) -> str:
  """What a run of the experiment will do, said before the first run starts."""
  rungs = list(dict.fromkeys(k.rung for k in configs))
  arms = list(dict.fromkeys(k.arm for k in configs))
  steps = {r: sorted({c.train.steps for k, c in configs.items() if k.rung == r}) for r in rungs}
  per_rung = ', '.join(f"{r + ': ' if r else ''}{sum(k.rung == r for k in configs)} runs of "
                       f"{'/'.join(map(str, steps[r]))} steps" for r in rungs)
  return (f'{len(configs)} runs ({len(arms)} arms' + (f' x {len(rungs)} rungs' if rungs != [None]
                                                       else '') + f' x their seeds; {per_rung})'
          + (', smoke size' if smoke else '') + f': {len(configs) - len(todo)} finished, '
          f'{len(todo)} to train')


def estimate_line(walls: list, flops: float, rest: list) -> str:
  """How long the remaining runs take, from the first ones trained here: walls, the first
  run's seconds and, when the second is another seed of the same config, its seconds (the
  first compiles, the second reuses: the difference is the compile); flops, their training
  FLOPs; rest, (config, compiles) of each run left. A run's work scales with its training
  FLOPs, a config's compile is taken as the first one's."""
  from moejax.costs.flops import train_flops
  if len(walls) > 1:
    compile_s, work_s = max(walls[0] - walls[1], 0.0), walls[1]
    left = sum(work_s * train_flops(c) / flops + (compile_s if compiles else 0.0)
               for c, compiles in rest)
    return (f'the first run took {walls[0]:.0f} s (compiling), the second {walls[1]:.0f} s; '
            f'the {len(rest)} left ({sum(c for _, c in rest)} of them compiling) would take '
            f'about {left / 60:.1f} min (their work scaled by training FLOPs)')
  left = sum(walls[0] * train_flops(c) / flops for c, _ in rest)
  return (f'the first run took {walls[0]:.0f} s; the {len(rest)} left would take at most about '
          f'{left / 60:.1f} min at its pace (scaled by their training FLOPs; the first run '
          'also compiled, and later seeds of a config reuse its programs)')


def run(exp: Experiment, workdir: str, smoke: bool = False, arms=None, seeds=None,
        progress: bool = True, rungs=None, log=None, until=None) -> dict:
  """Run every missing run, then write the report.

  Args:
    until: a sequential.Until: after the planned runs, add seeds in rounds to the comparisons
      still inconclusive until decided, at most until.max_seeds, within until.budget_s seconds
      of this call (the runs of a round cut short are trained by the next call).
  Returns:
    {arm: [result per seed]} without rungs; {rung: {arm: [result per seed]}} with rungs.
  """
  from moejax.experiment import report, sequential, tasks
  configs = plan(exp, smoke, arms, seeds, rungs)  # every config checked before the first compile
  log = log or (lambda line: print(line, file=sys.stderr, flush=True))
  state = sequential.load(workdir)
  if until:
    per_cell = collections.Counter((k.rung, k.arm) for k in configs)
    first = {}  # the planned seeds of each rung's comparisons
    for (rung, _), n in per_cell.items():
      first[rung] = max(first.get(rung, 0), n)
    state = sequential.declare(workdir, until, first)
  else:
    os.makedirs(workdir, exist_ok=True)
  if state:  # the seeds earlier rounds added, of the arms and rungs asked for
    for rung, arm, seed in (tuple(k) for r in state['rounds'] for k in r):
      key = RunKey(rung or None, arm, seed)
      if key not in configs and any((j.rung, j.arm) == (key.rung, key.arm) for j in configs):
        configs[key] = _added(exp, key, smoke)[1]
  manager = tasks.prepare(exp, log)  # the tasks each run is scored on, after the flags
  if not jax.config.jax_compilation_cache_dir:
    # Seeds of one arm compile the same programs: compile once, reuse from disk.
    jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, '.jax_cache'))
  todo = [k for k in configs if not _done(k, workdir)]
  log(plan_line(exp, configs, todo, smoke))
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(configs), initial=len(configs) - len(todo), desc=exp.name, unit='run',
               dynamic_ncols=True)
  say = (partial(bar.write, file=sys.stderr) if bar is not None else log)
  deadline = time.time() + until.budget_s if until else math.inf
  train_runs = partial(_train_missing, exp, configs, workdir=workdir, bar=bar, say=say,
                       deadline=deadline, smoke=smoke, manager=manager)
  finished = train_runs(todo)
  while until and finished:
    new = sequential.next_round(exp, configs, _collect(configs, workdir),
                                sequential.designs(state),
                                lambda r, a, s: _added(exp, RunKey(r, a, s), smoke))
    if not new:
      break
    state['rounds'].append([[k.rung or '', k.arm, k.seed] for k in new])
    sequential.write(workdir, state)
    say(f'round {len(state["rounds"])}: {len(new)} runs for the comparisons still inconclusive '
        f"({', '.join(sorted({_cell_name(k) for k in new if k.arm != exp.baseline}))})")
    configs.update(new)
    if bar is not None:
      bar.total = len(configs)
      bar.refresh()
    finished = train_runs(list(new), estimate=False)
  if not finished:
    left = sum(not _done(k, workdir) for k in configs)
    say(f'the budget is spent: {left} runs of this design left; the same command resumes them')
  if bar is not None:
    bar.close()
  if manager is not None:
    tasks.backfill(exp, list(configs), workdir, smoke, manager, log)
  results = _collect(configs, workdir)
  report.write(exp, workdir, results, configs, smoke, sequential.designs(state))
  return results if exp.rungs else results.get(None, {})


def _cell_name(key: RunKey) -> str:
  return f'{key.rung}/{key.arm}' if key.rung else key.arm


def _done(key: RunKey, workdir: str) -> bool:
  return os.path.exists(os.path.join(key.dir(workdir), 'result.json'))


def _added(exp: Experiment, key: RunKey, smoke: bool) -> tuple:
  """(key, config) of a run added until decided, validated as plan() validates the planned
  ones."""
  c = run_config(exp, key.arm, key.seed, smoke, key.rung)
  _validate(c, key)
  return key, c


def _collect(configs: dict, workdir: str) -> dict:
  """{rung: {arm: [result per seed, in the order of configs]}} of the finished runs."""
  results = {}
  for key in configs:
    path = os.path.join(key.dir(workdir), 'result.json')
    if os.path.exists(path):
      with open(path) as f:
        results.setdefault(key.rung, {}).setdefault(key.arm, []).append(json.load(f))
  return results


def _train_missing(exp: Experiment, configs: dict, todo: list, workdir: str, bar, say,
                   deadline: float, smoke: bool, manager, estimate: bool = True) -> bool:
  """Train the runs of todo that have no result yet (resuming each; manager: lm-eval's, when
  the experiment names tasks), saying the estimate of the rest after the first ones; False
  when the deadline would pass before the next run ends (by the seconds its cell's runs took
  so far)."""
  from moejax.training.loop import train
  from moejax.upcycle import upcycle
  walls = []  # seconds of the runs trained here, in order
  for key in todo:
    if _done(key, workdir):
      continue
    if deadline < math.inf and (
        time.time() + _expected_seconds(configs, key, workdir, walls) > deadline):
      return False
    if bar is not None:
      bar.set_postfix_str(' '.join(filter(None, [key.rung, key.arm, f'seed {key.seed}'])))
    run_dir = key.dir(workdir)
    os.makedirs(run_dir, exist_ok=True)
    result = _train_one(exp, key, configs[key], workdir, run_dir, train, upcycle, smoke,
                        manager)
    write_json(os.path.join(run_dir, 'result.json'), result)  # whole: the run is done
    walls.append(result['wall_s'])
    line = _estimate(configs, todo, walls) if estimate else ''
    if line:
      say(line)
    if bar is not None:
      bar.update(1)
  return True


def _expected_seconds(configs: dict, key: RunKey, workdir: str, walls: list) -> float:
  """How long a run will take: the fastest finished run of its (rung, arm) cell (a later seed
  reuses the compiled programs), else the last run trained here, else 0 (unknown)."""
  seen = []
  for k in configs:
    path = os.path.join(k.dir(workdir), 'result.json')
    if (k.rung, k.arm) == (key.rung, key.arm) and os.path.exists(path):
      with open(path) as f:
        seen.append(json.load(f).get('wall_s', 0.0))
  return min(seen) if seen else (walls[-1] if walls else 0.0)


def _estimate(configs: dict, todo: list, walls: list) -> str:
  """The estimate to say after a run trained here ('' for none): after the second run when it
  is another seed of the first one's config, else after the first."""
  from moejax.costs.flops import train_flops
  cell = lambda k: (k.rung, k.arm)  # noqa: E731 (the runs of a cell share their programs)
  same = len(todo) > 1 and cell(todo[1]) == cell(todo[0])
  n = 2 if same else 1
  if len(walls) != n or len(todo) <= n:
    return ''
  seen = {cell(k) for k in todo[:n]}
  rest = []
  for k in todo[n:]:
    rest.append((configs[k], cell(k) not in seen))
    seen.add(cell(k))
  return estimate_line(walls, train_flops(configs[todo[0]]), rest)


def _train_one(exp: Experiment, key: RunKey, c, workdir: str, run_dir: str, train,
               upcycle, smoke: bool, manager) -> dict:
  """Train one run (resuming it), evaluate it on the experiment's tasks and summarize it; a
  diverged run's result says so."""
  from moejax.experiment import tasks
  from moejax.experiment.report import commit
  spec = exp.arm(key.arm)
  start = time.time()
  if spec.upcycle_from and not os.path.isdir(os.path.join(run_dir, 'checkpoints')):
    source = RunKey(key.rung, spec.upcycle_from, key.seed).dir(workdir)
    upcycle(c, source, run_dir, spec.upcycle_mode, int(spec.upcycle_at * c.train.steps))
  try:
    train(c, run_dir)
  except Diverged as e:
    return {'diverged': str(e), 'wall_s': time.time() - start,  # this session's time
            'train_tokens': c.train.steps * c.train.batch_size * c.data.seq_len,
            'commit': commit()}
  post = {f'{n}/loss': post_evaluate(c, run_dir, exp.post_eval(n).overrides)
          for n in post_evals_of(exp, key.arm)}
  if manager is not None:
    post.update(tasks.evaluate_run(exp, run_dir, smoke, manager))
  rows = read_metrics(os.path.join(run_dir, 'metrics.jsonl'))
  return {**summarize_run(rows, c, exp, post), 'wall_s': time.time() - start,
          'commit': commit()}
