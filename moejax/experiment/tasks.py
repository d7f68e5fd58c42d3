"""Downstream tasks in an experiment (`Experiment.tasks`): every finished run's final checkpoint
is evaluated on lm-eval tasks (moejax.evaluate), its scores stored in the run's result.json as
'task/NAME/METRIC' (with 'task/NAME/documents', the documents evaluated, and
'task/NAME/higher_is_better', lm-eval's direction of each metric) and lm-eval's own
results in RUN/eval/lm_eval_step_S.json. Runs that finished before the experiment named its
tasks are evaluated when it is run again, without training. The report adds the columns and the
paired comparison (report.py).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os

from moejax.errors import ConfigError
from moejax.evaluate import tasks as lm_tasks
from moejax.training.metrics import write_json


def key(name: str, metric: str) -> str:
  """The result.json key of a task's metric."""
  return f'task/{name}/{metric}'


def prepare(exp, say=print):
  """Check the experiment's tasks before any run trains: its fields, every task known and its
  data readable, the compared metric reported. Returns lm-eval's task manager; None without
  tasks, or when lm-eval is not installed: then the runs train without task scores (say()
  tells how to add them: install the extra, run the command again)."""
  spec = exp.tasks
  if spec is None:
    return None
  where = f'experiment {exp.name!r}: Tasks'
  if not spec.names:
    raise ConfigError(f'{where}.names: name at least one lm-eval task, or drop tasks=')
  if spec.limit is not None and spec.limit < 1:
    raise ConfigError(f'{where}.limit={spec.limit}: documents per task, at least 1 (or None)')
  if spec.smoke_limit < 1 or spec.batch_size < 1:
    raise ConfigError(f'{where}.smoke_limit and .batch_size: must be at least 1')
  if not spec.delta > 0:
    raise ConfigError(f'{where}.delta={spec.delta}: the equivalence margin must be positive')
  try:
    lm_tasks.require()
  except ConfigError:
    say(f'the runs are not scored on {", ".join(spec.names)}: lm-eval is not installed '
        f'({lm_tasks.INSTALL}, then run the same command again: the finished runs are scored '
        'without training)')
    return None
  include = [lm_tasks.tasks_dir(), *spec.include_path]
  with _quiet():
    manager, loaded = lm_tasks.load_tasks(list(spec.names), include, f'{where}.names',
                                          f'{where}.include_path')
  for name, built in loaded.items():
    task = built['tasks'].get(name)
    metrics = getattr(task, '_metric_fn_list', None) if task is not None else None
    if metrics is not None and spec.metric not in metrics:
      raise ConfigError(f'{where}.metric={spec.metric!r}: task {name!r} reports '
                        f'{sorted(metrics)}; compare one of them')
  return manager


@contextlib.contextmanager
def _quiet():
  """lm-eval's per-task notices, once per run, would drown the experiment's progress."""
  log = logging.getLogger('lm_eval')
  level = log.level
  log.setLevel(logging.ERROR)
  try:
    yield
  finally:
    log.setLevel(level)


def evaluate_run(exp, run_dir: str, smoke: bool, manager) -> dict:
  """{'task/NAME/METRIC': value, 'task/NAME/documents': n} of a run's final checkpoint (its
  newest); lm-eval's results written to RUN/eval/lm_eval_step_S.json."""
  spec = exp.tasks
  limit = spec.smoke_limit if smoke else spec.limit
  names = list(spec.names)
  with _quiet():
    results, step = lm_tasks.evaluate(run_dir, names, manager, None, spec.batch_size, 0, limit,
                                      spec.num_fewshot, progress=False)
  lm_tasks.write(results, os.path.join(run_dir, 'eval', f'lm_eval_step_{step}.json'),
                 {'workdir': os.path.abspath(run_dir), 'step': step, 'tasks': names,
                  'limit': limit, 'num_fewshot': spec.num_fewshot})
  out = {}
  for name in names:
    for metric, value in lm_tasks.scores(results, name).items():
      out[key(name, metric)] = value
    counted = results.get('n-samples', {}).get(name, {})
    out[key(name, 'documents')] = counted.get('effective')
    out[key(name, 'higher_is_better')] = results.get('higher_is_better', {}).get(name, {})
  return out


def higher_is_better(results: list[dict], name: str, metric: str) -> bool:
  """Whether lm-eval says a task's metric is better higher (accuracy) or lower (perplexity)."""
  for r in results:
    said = (r.get(key(name, 'higher_is_better')) or {}).get(metric)
    if said is not None:
      return bool(said)
  return True


def missing(exp, result: dict) -> bool:
  """Whether a finished run still lacks the scores of a task the experiment names."""
  return (exp.tasks is not None and 'diverged' not in result and
          any(key(n, 'documents') not in result for n in exp.tasks.names))


def backfill(exp, keys: list, workdir: str, smoke: bool, manager, say) -> int:
  """Evaluate the finished runs of keys that lack task scores (they trained before the
  experiment named these tasks) and add the scores to their result.json; how many."""
  todo = []
  for k in keys:
    path = os.path.join(k.dir(workdir), 'result.json')
    if os.path.exists(path):
      with open(path) as f:
        result = json.load(f)
      if missing(exp, result):
        todo.append((k, path, result))
  if todo:
    say(f'evaluating {len(todo)} finished run(s) on {", ".join(exp.tasks.names)} '
        '(trained before the experiment named these tasks)')
  for k, path, result in todo:
    result.update(evaluate_run(exp, k.dir(workdir), smoke, manager))
    write_json(path, result)
  return len(todo)


def columns(exp, results: list[dict]) -> list[tuple[str, str]]:
  """(result key, column title) of each task metric the runs report, the compared metric
  first (standard errors and document counts left to the JSON)."""
  if exp.tasks is None:
    return []
  out = []
  for name in exp.tasks.names:
    seen = {k.split('/', 2)[2] for r in results for k in r if k.startswith(f'task/{name}/')}
    metrics = sorted(m for m in seen if not m.endswith('_stderr') and
                     m not in ('documents', 'higher_is_better'))
    metrics.sort(key=lambda m: m != exp.tasks.metric)
    out += [(key(name, m), f'{name} {m}') for m in metrics]
  return out
