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

import os
import sys

from moejax.errors import ConfigError
from moejax.evaluate import tasks


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
  tasks.require()
  from lm_eval import utils as lm_utils
  include = [p.strip() for p in a.include_path.split(',') if p.strip()]
  manager, _ = tasks.load_tasks(names, include)  # before the checkpoint: bad tasks cost nothing
  limit = None if a.limit is None else (int(a.limit) if a.limit >= 1 else a.limit)
  results, step = tasks.evaluate(a.workdir, names, manager, a.step, a.batch_size, a.max_length,
                                 limit, a.num_fewshot, a.bootstrap_iters, a.seed)
  print(lm_utils.make_table(results))
  if 'groups' in results:
    print(lm_utils.make_table(results, 'groups'))
  out = tasks.write(results, a.output or os.path.join(a.workdir, 'eval',
                                                      f'lm_eval_step_{step}.json'),
                    {'workdir': os.path.abspath(a.workdir), 'step': step, 'tasks': names,
                     'limit': limit, 'num_fewshot': a.num_fewshot})
  print(f'results: {out}')
  return 0


def main(argv=None) -> int:
  from moejax import cli
  return cli.run(_main, argv)


if __name__ == '__main__':
  sys.exit(main())
