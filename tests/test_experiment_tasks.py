"""Downstream tasks in experiments (moejax/experiment/tasks.py): the report's task columns and
their comparison by the loss's tests (hand-made results, both directions of a metric, the
task's own margin), the checks before anything trains, and (slow) the runner end to end:
accuracy from a hand computation on each run's final checkpoint, finished runs scored later
without training."""
import json
import os
import pathlib

import numpy as np
import pytest

lm_eval = pytest.importorskip('lm_eval')

from moejax import experiment  # noqa: E402
from moejax.config import ConfigError  # noqa: E402
from moejax.evaluate.tasks import offline  # noqa: E402
from moejax.experiment import Experiment, Tasks, report  # noqa: E402
from moejax.experiment import tasks as exp_tasks  # noqa: E402

offline()
TASKS = pathlib.Path(__file__).resolve().parents[1] / 'experiments' / 'tasks'


def _exp(**kw):
  from conftest import tiny_config
  return Experiment(name='x', base=tiny_config(), seeds=(0, 1, 2, 3, 4), baseline='base',
                    arms={'base': {}, 'up': {}, 'down': {}, 'close': {}}, **kw)


def _results(acc: dict, metric='acc', higher=True):
  """{arm: [result per seed]}: the val loss equal in every arm, the task's metric as given."""
  return {arm: [{'val_loss': 2.0 + 0.01 * s, 'val_bpb': 3.0, 'max_vio_global': 0.3,
                 'train_flops': 1e9, 'final_step': 10, 'train_tokens': 1000,
                 exp_tasks.key('t', metric): float(v), exp_tasks.key('t', f'{metric}_stderr'): 0.01,
                 exp_tasks.key('t', 'documents'): 400,
                 exp_tasks.key('t', 'higher_is_better'): {metric: higher}}
                for s, v in enumerate(vs)] for arm, vs in acc.items()}


def _row(md: str, after: str, arm: str) -> str:
  return next(line for line in md[md.index(after):].splitlines()
              if line.startswith(f'| {arm} | paired |'))


def test_the_report_compares_task_accuracy_in_its_direction_and_margin(tmp_path):
  """'up' scores 0.05 above the baseline at every seed (+ noise), 'down' 0.05 below, 'close'
  0.012 above with tiny noise: inside the task's margin 0.02 but outside the loss's 0.01, so
  only the task's delta makes it 'better, within delta'."""
  exp = _exp(tasks=Tasks(('t',), delta=0.02), delta=0.01)
  configs = experiment.plan(exp)
  rng = np.random.default_rng(0)
  base = 0.4 + rng.normal(0, 0.03, 5)
  acc = {'base': base, 'up': base + 0.05 + rng.normal(0, 0.003, 5),
         'down': base - 0.05 + rng.normal(0, 0.003, 5),
         'close': base + 0.012 + rng.normal(0, 0.0005, 5)}
  results = _results(acc)
  md = open(report.write(exp, str(tmp_path), {None: results}, configs, smoke=False)).read()
  header = next(line for line in md.splitlines() if line.startswith('| arm | seeds |'))
  assert header.endswith('| t acc |') and 'stderr' not in header and 'documents' not in header
  row = next(line for line in md.splitlines() if line.startswith('| up | 5 |'))
  ups = acc['up']
  assert row.endswith(f'| {ups.mean():.3f} ± {ups.std(ddof=1):.3f} |')
  assert '- Tasks: `t` (400 documents)' in md
  task = 'On the task `t`, acc'
  assert '(higher is better; equivalence margin delta = 0.02)' in md
  assert _row(md, task, 'up').endswith('| **better** |')
  assert _row(md, task, 'down').endswith('| **worse** |')
  assert _row(md, task, 'close').endswith('| **better, within delta** |')
  diff = float(_row(md, task, 'up').split('|')[4].split('[')[0])
  assert diff == pytest.approx((acc['up'] - acc['base']).mean(), abs=1e-4)
  # The loss's own table is untouched by the task: equal losses, equivalent within 0.01.
  assert _row(md, 'on val loss', 'up').endswith('| **equivalent** |')
  # A metric lm-eval calls lower-is-better (a perplexity) turns the verdicts around.
  exp = _exp(tasks=Tasks(('t',), metric='word_perplexity', delta=0.02))
  lower = _results(acc, 'word_perplexity', higher=False)
  (tmp_path / 'ppl').mkdir()
  md = open(report.write(exp, str(tmp_path / 'ppl'), {None: lower}, configs, False)).read()
  assert '(lower is better;' in md
  assert _row(md, 'On the task `t`', 'up').endswith('| **worse** |')
  assert _row(md, 'On the task `t`', 'down').endswith('| **better** |')


def _refused(tmp_path, spec, *expected):
  with pytest.raises(ConfigError) as e:
    experiment.run(_exp(tasks=spec), str(tmp_path / 'w'), smoke=True, progress=False,
                   log=lambda *_: None)
  for text in expected:
    assert text in str(e.value), (text, str(e.value))
  assert not (tmp_path / 'w' / 'base').exists()  # nothing trained


def test_tasks_are_checked_before_anything_trains(tmp_path):
  """(An unknown task's hint indexes all of lm-eval's tasks: the slow test.)"""
  refused = lambda *a: _refused(tmp_path, *a)  # noqa: E731
  refused(Tasks(('python_line_end',), metric='f1'), "Tasks.metric='f1'", "['acc', 'acc_norm']")
  refused(Tasks(()), 'Tasks.names: name at least one')
  refused(Tasks(('python_line_end',), delta=0), 'Tasks.delta=0')
  refused(Tasks(('python_line_end',), limit=0), 'Tasks.limit=0')
  refused(Tasks(('python_line_end',), include_path=str(tmp_path / 'no')),
          'Tasks.include_path=', 'no such folder')


def test_a_task_read_for_the_first_time_loads_silently(tmp_path, capfd):
  """A local file new to the datasets cache is converted with a progress bar: not printed (a
  command's user error must stay one line)."""
  import shutil
  from moejax.evaluate.tasks import load_tasks
  shutil.copytree(TASKS, tmp_path / 'tasks')  # a new path: new to the cache
  capfd.readouterr()
  _, loaded = load_tasks(['python_completion'], [str(tmp_path / 'tasks')])
  assert len(loaded['python_completion']['tasks']['python_completion'].eval_docs) == 12
  out, err = capfd.readouterr()
  assert 'Generating' not in out + err and 'Custom kwargs' not in out + err, (out, err)


def test_without_lm_eval_the_runs_train_unscored_and_say_how_to_score_them(monkeypatch):
  monkeypatch.setitem(__import__('sys').modules, 'lm_eval', None)  # not installed
  said = []
  assert exp_tasks.prepare(_exp(tasks=Tasks(('python_line_end',))), said.append) is None
  assert said == ["the runs are not scored on python_line_end: lm-eval is not installed (pip "
                  "install 'moejax[eval]', then run the same command again: the finished runs "
                  'are scored without training)']


def test_every_shipped_experiment_names_a_shipped_task():
  """The experiments' task is found in the shipped folder and reports the compared metric."""
  from moejax.experiments.common import TASKS as shipped
  exp = _exp(tasks=shipped)
  assert exp_tasks.prepare(exp) is not None
  rows = [json.loads(line) for line in open(TASKS / 'python_line_end.jsonl')]
  assert len(rows) == 1000 and {r['answer'] for r in rows} == {0, 1, 2, 3}
  for r in rows:  # four distinct endings of one length, each a line's last bytes
    assert len({len(c) for c in r['choices']}) == 1 and len(set(r['choices'])) == 4
    assert len(r['choices'][0]) in (6, 8, 10, 12) and all(
        c.endswith('\n') and '\n' not in c[:-1] for c in r['choices'])
    assert len(r['context']) == 40 and len(r['context']) + len(r['choices'][0]) <= 64
    assert r['context'].rsplit('\n', 1)[-1].strip()  # the line's start is in the context
  from moejax.data import corpus
  assert all(corpus.is_validation(r['file'], 5) for r in rows)  # held out: no run trains on it


def _accuracy_by_hand(run_dir: str, docs: list[dict]) -> tuple[float, float]:
  """The share of documents whose right choice has the highest summed log-likelihood, from the
  final checkpoint's logits in float64 (bytes: a token is a byte; lm-eval moves the context's
  trailing spaces to the continuation), and the smallest gap between a document's best and
  second-best choice."""
  import jax
  import ml_collections
  from moejax.generate import load_checkpoint
  from moejax.model.transformer import Transformer
  config, variables = load_checkpoint(run_dir)
  model = Transformer(ml_collections.FrozenConfigDict(config.model), train=False)
  apply = jax.jit(model.apply)
  right, gap = 0, np.inf
  for doc in docs:
    scores = []
    for choice in doc['choices']:
      context, continuation = doc['context'], choice
      n = len(context) - len(context.rstrip())
      if n:
        context, continuation = context[:-n], context[-n:] + continuation
      ctx, cont = list(context.encode()), list(continuation.encode())
      row = ctx + cont
      logits = np.asarray(apply(variables, np.asarray(row[:-1])[None])[0][0], np.float64)
      top = logits.max(-1, keepdims=True)
      logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
      first = len(ctx) - 1
      scores.append(sum(logp[first + j, t] for j, t in enumerate(cont)))
    right += int(np.argmax(scores)) == doc['answer']
    top2 = np.sort(scores)[-2:]
    gap = min(gap, top2[1] - top2[0])
  return right / len(docs), gap


@pytest.mark.slow  # two short runs, each scored on a task
def test_runs_are_scored_on_their_final_checkpoint_and_late_tasks_fill_in(tmp_path, monkeypatch):
  from conftest import tiny_config
  c = tiny_config()
  c.train.checkpoint_every = 2  # checkpoints at 2, 4 and 6: the task reads the last
  exp = Experiment(name='x', base=c, arms={'a': {}}, seeds=(0, 1),
                   tasks=Tasks(('python_completion',)))
  _refused(tmp_path, Tasks(('python_line_en',)),
           "Tasks.names: lm-eval has no task 'python_line_en'", 'did you mean python_line_end')
  workdir = str(tmp_path / 'runs')
  said = []
  results = experiment.run(exp, workdir, progress=False, log=said.append)['a']
  docs = [json.loads(line) for line in open(TASKS / 'python_completion.jsonl')]
  for seed, r in enumerate(results):
    run_dir = os.path.join(workdir, 'a', f'seed_{seed}')
    saved = json.load(open(os.path.join(run_dir, 'eval', 'lm_eval_step_6.json')))
    assert saved['moejax']['step'] == 6 and r[exp_tasks.key('python_completion', 'documents')] == 12
    assert r['task/python_completion/acc'] == saved['results']['python_completion']['acc,none']
    acc, gap = _accuracy_by_hand(run_dir, docs)
    # Accuracy is a count of argmaxes: equal exactly, as long as no two choices are nearer than
    # lm-eval's float32 sums can resolve (about 1e-5 nats over 60 byte terms; 1e-3 is far).
    assert gap > 1e-3 and r['task/python_completion/acc'] == acc
  # The two seeds are different models: if their scores agree, the check says nothing new.
  assert results[0]['task/python_completion/acc_norm'] != results[1][
      'task/python_completion/acc_norm'] or results[0]['val_loss'] != results[1]['val_loss']
  # A run that finished before its experiment named the task is scored without training.
  path = os.path.join(workdir, 'a', 'seed_1', 'result.json')
  before = json.load(open(path))
  json.dump({k: v for k, v in before.items() if not k.startswith('task/')}, open(path, 'w'))
  from moejax.training import loop
  monkeypatch.setattr(loop, 'train', lambda *a: pytest.fail('trained again'))
  said.clear()
  again = experiment.run(exp, workdir, progress=False, log=said.append)['a']
  assert said[1] == ('evaluating 1 finished run(s) on python_completion (trained before the '
                     'experiment named these tasks)')
  assert again[1] == before and again[0] == results[0]
  md = open(os.path.join(workdir, 'results.md')).read()
  assert '| python_completion acc | python_completion acc_norm |' in md
