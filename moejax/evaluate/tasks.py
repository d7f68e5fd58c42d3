"""lm-eval tasks on a checkpoint, for the command (`python -m moejax.evaluate`) and for the
experiments (each run's final checkpoint): loading tasks offline with one-line errors, running
them, writing the results as JSON, and reading a task's scores back.

The shipped task files are `experiments/tasks` (`tasks_dir()`, also in an installed
moejax). Nothing is downloaded: `offline()` sets the Hugging Face libraries' offline flags
before they are imported (a user's own setting wins).
"""
from __future__ import annotations

import contextlib
import logging
import os

from moejax.errors import ConfigError

INSTALL = "pip install 'moejax[eval]'"


def tasks_dir() -> str:
  """The shipped task folder: experiments/tasks (the package moejax.experiments)."""
  import moejax.experiments
  return os.path.join(os.path.dirname(os.path.abspath(moejax.experiments.__file__)), 'tasks')


def offline():
  """Nothing is downloaded at run time: datasets and the hub read their local caches only."""
  os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
  os.environ.setdefault('HF_HUB_OFFLINE', '1')


def require(what: str = 'python -m moejax.evaluate'):
  """lm-eval importable, or one ConfigError line saying how to install it."""
  offline()
  try:
    import lm_eval  # noqa: F401
  except ImportError:
    raise ConfigError(f'{what} needs lm-eval, which is not installed: {INSTALL}') from None
  logging.getLogger('lm_eval.api.task').addFilter(_custom_kwargs_notice)  # once: same object


def datasets_cache() -> str:
  return os.environ.get('HF_DATASETS_CACHE') or os.path.join(
      os.environ.get('HF_HOME', os.path.join(os.path.expanduser('~'), '.cache', 'huggingface')),
      'datasets')


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f'{type(e).__name__}: {text.splitlines()[0]}' if text else type(e).__name__


def load_tasks(names: list[str], include_path: list[str], tasks_field: str = '--tasks',
               path_field: str = '--include_path'):
  """(task manager, {name: its loaded tasks}), every failure one ConfigError line naming the
  field (the command's flags, or an experiment's fields). Tasks all found in include_path are
  loaded without indexing lm-eval's thousands of built-in ones (seconds saved per call)."""
  require()
  from lm_eval.tasks import TaskManager
  for path in include_path:
    if not os.path.isdir(path):
      raise ConfigError(f'{path_field}={path}: no such folder of task YAML files')
  if include_path:
    local = TaskManager(include_path=include_path, include_defaults=False)
    if set(names) <= set(local.all_tasks):
      try:
        return local, _load(local, names, tasks_field, path_field)
      except ConfigError:
        pass  # a local task may build on built-in ones: try again with them indexed
  manager = TaskManager(include_path=include_path or None)
  known = set(manager.all_tasks)
  for name in names:
    if name not in known:
      import difflib
      near = difflib.get_close_matches(name, sorted(known), n=3)
      hint = f' (did you mean {", ".join(near)}?)' if near else ''
      where = f' or in {", ".join(include_path)}' if include_path else ''
      raise ConfigError(f'{tasks_field}: lm-eval has no task {name!r}{where}{hint}; a task of '
                        f'your own is a YAML file in a folder given by {path_field}')
  return manager, _load(manager, names, tasks_field, path_field)


def _load(manager, names: list[str], tasks_field: str, path_field: str) -> dict:
  import datasets
  bars = datasets.is_progress_bar_enabled()
  datasets.disable_progress_bars()  # "Generating test split" as a local file is first read
  try:
    return _load_each(manager, names, tasks_field, path_field)
  finally:
    if bars:
      datasets.enable_progress_bars()


def _load_each(manager, names: list[str], tasks_field: str, path_field: str) -> dict:
  loaded = {}
  for name in names:
    try:
      loaded[name] = manager.load([name])
    except Exception as e:  # the dataset's loader names what it could not read
      raise ConfigError(
          f'{tasks_field}: {name}: its data could not be read ({_first_line(e)}); lm-eval reads '
          'a dataset_path through Hugging Face datasets, from its cache ' + datasets_cache() +
          ' or the local files a task YAML names, and nothing is downloaded here: fetch it '
          f'where there is a network, or point a task YAML at local files ({path_field}; '
          'docs/evaluation.md)') from None
  return loaded


def _git_commit():
  """What lm-eval records as the commit, asked of git without its complaint outside a checkout
  (lm-eval's own asker lets git print 'fatal: not a git repository' there)."""
  import subprocess
  try:
    out = subprocess.run(['git', 'describe', '--always'], capture_output=True, text=True)
  except OSError:
    return None
  return out.stdout.strip() or None


def _custom_kwargs_notice(record) -> bool:
  """False for lm-eval's notice, on every task whose data a function reads (the shipped tasks'
  local_files.py), that a custom dataset takes --metadata: no option of this command."""
  return 'Custom kwargs can be passed' not in record.getMessage()


@contextlib.contextmanager
def _quiet(progress: bool):
  """Git asked quietly, and with progress False lm-eval's progress bars (tqdm, on sys.stderr)
  set aside: the experiments show their own."""
  import io
  from unittest import mock
  from lm_eval import evaluator
  with contextlib.ExitStack() as stack:
    stack.enter_context(mock.patch.object(evaluator, 'get_git_commit_hash', _git_commit))
    if not progress:
      stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    yield


def evaluate(workdir: str, names: list[str], manager, step: int | None = None,
             batch_size: int = 8, max_length: int = 0, limit=None, num_fewshot=None,
             bootstrap_iters: int = 1000, seed: int = 1234, progress: bool = True):
  """Run lm-eval's tasks on a checkpoint (progress: lm-eval's progress bars).

  Returns:
    (lm-eval's results dict, the checkpoint step evaluated).
  """
  from lm_eval import evaluator
  from moejax.evaluate.harness import MoejaxLM
  lm = MoejaxLM(workdir, step, batch_size, max_length)
  with _quiet(progress):
    results = evaluator.simple_evaluate(
        model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
        bootstrap_iters=bootstrap_iters, log_samples=False, random_seed=seed,
        numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
  return results, lm.step


def write(results: dict, path: str, meta: dict) -> str:
  """The results as JSON (lm-eval's sections, and what was evaluated under 'moejax')."""
  from lm_eval import utils as lm_utils
  from moejax.training.metrics import write_json
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  keep = {k: results[k] for k in ('results', 'groups', 'configs', 'versions', 'n-shot',
                                  'higher_is_better', 'n-samples') if k in results}
  keep['moejax'] = meta
  write_json(path, keep, indent=1, default=lm_utils.handle_non_serializable)
  return path


def scores(results: dict, name: str) -> dict[str, float]:
  """{metric: value} of one task (its metrics and their standard errors, lm-eval's 'acc,none'
  filter suffix dropped: 'acc', 'acc_stderr', ...; not its document count 'sample_len')."""
  out = {}
  for key, value in results['results'][name].items():
    metric, _, _ = key.partition(',')
    if (isinstance(value, (int, float)) and not isinstance(value, bool) and
        metric not in ('alias', 'sample_len')):
      out[metric] = float(value)
  return out
