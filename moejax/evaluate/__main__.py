"""Evaluate a checkpoint with lm-evaluation-harness, the way papers report downstream accuracy.

python -m moejax.evaluate --workdir=RUN --tasks=hellaswag,arc_easy [--include_path=DIR]
    [--num_fewshot=N] [--limit=N] [--batch_size=8] [--step=S] [--output=FILE]

RUN is any moejax checkpoint: a training run, an imported Hugging Face model, an experiment's
run; its own tokenizer turns text into ids. Results print as lm-eval prints them and are
written as JSON to RUN/eval/lm_eval_step_S.json (or --output). Nothing is downloaded: a task
reads its data from Hugging Face datasets' local cache, or from local files named in a task
YAML under --include_path (docs/evaluation.md has a worked example). Needs the `eval` extra:
pip install 'moejax[eval]'.
"""
from __future__ import annotations

import json
import os
import sys

from moejax.errors import ConfigError

INSTALL = "python -m moejax.evaluate needs lm-eval: pip install 'moejax[eval]'"


def parser():
  from moejax import cli
  p = cli.ArgumentParser(prog='python -m moejax.evaluate', description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True, help='the checkpoint to evaluate: a training run, '
                 'an imported Hugging Face model or an experiment run (its tokenizer is used)')
  p.add_argument('--tasks', required=True, help='comma-separated lm-eval task (or group) names')
  p.add_argument('--include_path', default='', help='comma-separated folders of task YAML '
                 'files (e.g. tasks over local JSON or Parquet files)')
  p.add_argument('--num_fewshot', type=int, default=None,
                 help="examples put before each question (default: each task's own)")
  p.add_argument('--limit', type=float, default=None, help='evaluate only the first N '
                 'documents of each task (a fraction below 1: that share of them)')
  p.add_argument('--batch_size', type=int, default=8, help='rows scored per forward pass')
  p.add_argument('--max_length', type=int, default=0,
                 help='the longest input given to the model (0: model.max_seq_len)')
  p.add_argument('--step', type=int, default=None,
                 help='a checkpoint step (default: the newest intact one)')
  p.add_argument('--output', default='', help='the JSON results file (default: '
                 'WORKDIR/eval/lm_eval_step_S.json)')
  p.add_argument('--bootstrap_iters', type=int, default=1000,
                 help="lm-eval's bootstrap resamples for the standard errors (0: none)")
  p.add_argument('--seed', type=int, default=1234, help='the few-shot sampling seed')
  return p


def offline():
  """Nothing is downloaded at run time: datasets and the hub read their local caches only
  (set before they are imported; a user's own setting wins)."""
  os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
  os.environ.setdefault('HF_HUB_OFFLINE', '1')


def _datasets_cache() -> str:
  return os.environ.get('HF_DATASETS_CACHE') or os.path.join(
      os.environ.get('HF_HOME', os.path.join(os.path.expanduser('~'), '.cache', 'huggingface')),
      'datasets')


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f'{type(e).__name__}: {text.splitlines()[0]}' if text else type(e).__name__


def load_tasks(names: list[str], include_path: list[str]):
  """(task manager, {name: its tasks}) with every failure one ConfigError line."""
  from lm_eval.tasks import TaskManager
  for path in include_path:
    if not os.path.isdir(path):
      raise ConfigError(f'--include_path={path}: no such folder of task YAML files')
  manager = TaskManager(include_path=include_path or None)
  known = set(manager.all_tasks)
  for name in names:
    if name not in known:
      import difflib
      near = difflib.get_close_matches(name, sorted(known), n=3)
      hint = f' (did you mean {", ".join(near)}?)' if near else ''
      where = f' or in {", ".join(include_path)}' if include_path else ''
      raise ConfigError(f'--tasks: lm-eval has no task {name!r}{where}{hint}; a task of your '
                        'own is a YAML file in a folder given by --include_path')
  loaded = {}
  for name in names:
    try:
      loaded[name] = manager.load([name])
    except Exception as e:  # the dataset's loader names what it could not read
      raise ConfigError(
          f'--tasks: {name}: its data could not be read ({_first_line(e)}); lm-eval reads a '
          'dataset_path through Hugging Face datasets, from its cache ' + _datasets_cache() +
          ' or the local files a task YAML names, and nothing is downloaded here: fetch it '
          'where there is a network, or point a task YAML at local files (--include_path; '
          'docs/evaluation.md)') from None
  return manager, loaded


def _main(argv=None) -> int:
  a = parser().parse_args(argv)
  names = [t.strip() for t in a.tasks.split(',') if t.strip()]
  if not names:
    raise ConfigError(f'--tasks={a.tasks!r}: give at least one task name')
  if a.batch_size < 1:
    raise ConfigError(f'--batch_size={a.batch_size}: must be at least 1')
  if a.limit is not None and not a.limit > 0:
    raise ConfigError(f'--limit={a.limit}: must be positive (documents, or a fraction below 1)')
  if not os.path.isdir(a.workdir):
    raise ConfigError(f'--workdir={a.workdir}: no such run')
  offline()
  try:
    import lm_eval  # noqa: F401
  except ImportError:
    raise ConfigError(INSTALL) from None
  from lm_eval import evaluator, utils as lm_utils
  from moejax.evaluate.harness import MoejaxLM
  include = [p.strip() for p in a.include_path.split(',') if p.strip()]
  manager, _ = load_tasks(names, include)  # before the checkpoint: bad tasks cost nothing
  lm = MoejaxLM(a.workdir, a.step, a.batch_size, a.max_length)
  limit = None if a.limit is None else (int(a.limit) if a.limit >= 1 else a.limit)
  results = evaluator.simple_evaluate(
      model=lm, tasks=names, num_fewshot=a.num_fewshot, limit=limit, task_manager=manager,
      bootstrap_iters=a.bootstrap_iters, log_samples=False, random_seed=a.seed,
      numpy_random_seed=a.seed, torch_random_seed=a.seed, fewshot_random_seed=a.seed)
  print(lm_utils.make_table(results))
  if 'groups' in results:
    print(lm_utils.make_table(results, 'groups'))
  step = lm.step
  out = a.output or os.path.join(a.workdir, 'eval', f'lm_eval_step_{step}.json')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  keep = {k: results[k] for k in ('results', 'groups', 'configs', 'versions', 'n-shot',
                                  'higher_is_better', 'n-samples') if k in results}
  keep['moejax'] = {'workdir': os.path.abspath(a.workdir), 'step': step, 'tasks': names,
                    'limit': limit, 'num_fewshot': a.num_fewshot}
  with open(out, 'w') as f:
    json.dump(keep, f, indent=1, default=lm_utils.handle_non_serializable)
  print(f'results: {out}')
  return 0


def main(argv=None) -> int:
  from moejax import cli
  return cli.run(_main, argv)


if __name__ == '__main__':
  sys.exit(main())
