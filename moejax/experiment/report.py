"""An experiment's report: DIR/results.md and the plots (plots.py), from the runs' result.json
and metrics.jsonl files.

results.md says what was measured (units, steps, training and evaluation tokens, the base
config, the commit, the wall time), then per rung of the ladder (or once, without one) a table
of every arm (mean ± std over seeds) and the comparison of each arm with the baseline: paired
by seed where the two arms can pair (pairing.py), else as independent samples, with the
t-test, Holm's correction over the arms, the two one-sided tests of equivalence within the
experiment's margin delta, the minimum detectable effect and the seeds that would detect delta,
a verdict and the interval it rests on (statistics.py), and the look it was reached at where
seeds were added until decided (sequential.py). With a ladder, its section (ladder.py).
"""
from __future__ import annotations

import math
import os
import subprocess

import numpy as np

from moejax.experiment import ladder as ladder_section, plots, statistics, tasks
# comparisons and pairable are this module's too (the runner and the tests read them here)
from moejax.experiment.pairing import aligned, comparisons, finished, pairable  # noqa: F401
from moejax.model.schedule import moe_layer_ids
from moejax.training.metrics import read_metrics

BASE_COLUMNS = (('val_loss', 'val loss'), ('val_loss_se', 'eval SE'),
                ('val_bpb', 'val bits/byte'), ('max_vio_global', 'MaxVio global'),
                ('dropped_fraction', 'dropped'), ('active_experts', 'experts/token'),
                ('tokens_per_sec', 'tokens/s'), ('tflops_per_device', 'TFLOP/s/device'),
                ('mfu', 'MFU'))
SECONDARY = (('val_bpb', 'val bits/byte'), ('max_vio_global', 'MaxVio global'))


def _fmt(values) -> str:
  vals = [v for v in values if v is not None]
  if not vals:
    return '-'
  if isinstance(vals[0], (list, tuple)):  # per layer: mean of each layer, ' / ' separated
    return ' / '.join(_fmt([v[i] for v in vals]) for i in range(len(vals[0])))
  a = np.asarray(vals, dtype=float)
  never = int(np.isinf(a).sum())  # a step count never reached (e.g. steps to balance)
  if never == len(a):
    return 'never'
  a = a[np.isfinite(a)]
  digits = 0 if abs(a.mean()) >= 100 else 4 if abs(a.mean()) < 0.1 else 3
  std = f' ± {a.std(ddof=1):.{digits}f}' if len(a) > 1 else ''
  return f'{a.mean():.{digits}f}{std}' + (f' ({never} of {len(vals)} never)' if never else '')


def table(exp, results: dict, arms) -> str:
  """One row per arm: mean ± std over its seeds that finished; diverged runs counted."""
  cols = list(BASE_COLUMNS) + [(k, k) for k in exp.columns] + [
      (f'{k}/loss', f'{k} loss') for k in exp.post_evals] + tasks.columns(
          exp, [r for rs in results.values() for r in rs])
  lines = ['| arm | seeds | ' + ' | '.join(title for _, title in cols) + ' |',
           '|---' * (len(cols) + 2) + '|']
  for arm in arms:
    rs = results.get(arm, [])
    ok = finished(rs)
    seeds = f'{len(ok)}' + (f' ({len(rs) - len(ok)} diverged)' if len(ok) < len(rs) else '')
    lines.append(f'| {arm} | {seeds} | ' + ' | '.join(_fmt([r.get(k) for r in ok])
                                                     for k, _ in cols) + ' |')
  return '\n'.join(lines)


def _level(level: float) -> str:
  return f'{100 * level:.3g}%'


def _p(p: float) -> str:
  return '-' if p is None or math.isnan(p) else f'{p:.2g}'


def _verdicts(comps: dict, design, smoke: bool) -> list[str]:
  """The rows of a comparison table (one per arm against the baseline)."""
  lines = ['| arm | pairing | seeds | ' + ('look | ' if design else '') +
           'difference [interval] (level) | p | p (Holm) | TOST p (Holm) | MDE | '
           'seeds for delta | verdict |', '|---' * (11 if design else 10) + '|']
  for arm, c in comps.items():
    look = f'{design.analysed(c.n)[1]} of {design.looks} | ' if design else ''
    lines.append(
        f"| {arm} | {'paired' if c.paired else 'unpaired'} | {c.n} | {look}{c.diff:+.4f} "
        f'[{c.low:+.4f}, {c.high:+.4f}] ({_level(c.level)}) | {_p(c.p)} | {_p(c.p_holm)} | '
        f'{_p(c.p_tost_holm)} | {c.mde:.4f} | {c.seeds_needed:.0f} | '
        + ('none (smoke size)' if smoke else f'**{c.verdict}**') + ' |')
  return lines


def differences(exp, results: dict, configs: dict, rung, arms, smoke: bool = False,
                design=None) -> str:
  """The comparison table of each arm with the baseline (primary metric: val loss), then one
  per downstream task (its compared metric, higher is better); a smoke run's has no verdicts
  (a few steps decide nothing)."""
  comps = comparisons(exp, results, configs, rung, arms, design)
  if not comps:
    return ''
  looks = (f' Seeds were added until decided: the comparisons are looked at with '
           f"{', '.join(map(str, design.sizes()))} seeds, each test at 0.05 / {design.looks} (a "
           'Bonferroni boundary over the looks), and the verdict rests on the last completed '
           'look (column look).' if design else '')
  lines = [f'Against `{exp.baseline}`, on val loss (nats; equivalence margin delta = '
           f'{exp.delta:g}): the mean difference and the interval its verdict rests on (the '
           "t-interval of the paired differences, or Welch's when the arms cannot pair, at the "
           "level Holm's correction over the arms spends on that arm; for an equivalence "
           'verdict the interval of the two one-sided tests, which lies inside +-delta), the '
           "two-sided t-test and its p after Holm, the two one-sided tests of |difference| < "
           'delta after Holm, the smallest difference these seeds detect with 80% power (MDE), '
           'the seeds that would detect delta, and the verdict: better or worse exactly when '
           'the interval excludes 0.' + looks, '', *_verdicts(comps, design, smoke)]
  spec = exp.tasks
  for name in (spec.names if spec else ()):
    higher = tasks.higher_is_better([r for rs in results.values() for r in rs], name,
                                    spec.metric)
    on_task = comparisons(exp, results, configs, rung, arms, design,
                          tasks.key(name, spec.metric), spec.delta, lower_is_better=not higher)
    if on_task:
      lines += ['', f'On the task `{name}`, {spec.metric} of each run\'s final checkpoint '
                f"({'higher' if higher else 'lower'} is better; equivalence margin delta = "
                f'{spec.delta:g}), by the same tests, Holm over the arms:', '',
                *_verdicts(on_task, design, smoke)]
  rows = []
  for key, title in SECONDARY:
    for arm in arms:
      if arm == exp.baseline:
        continue
      a, b, paired = aligned(results, configs, rung, arm, exp.baseline, key)
      if min(len(a), len(b)) >= 2:
        c = statistics.compare(a, b, math.inf, paired)
        rows.append(f'| {title} | {arm} | {c.diff:+.4f} [{c.low:+.4f}, {c.high:+.4f}] | '
                    f'{_p(c.p)} |')
  if rows:
    lines += ['', 'Other metrics against the baseline (difference [95% t-interval], t-test p, '
              'not corrected):', '', '| metric | arm | difference [95% interval] | p |',
              '|---|---|---|---|'] + rows
  return '\n'.join(lines)


def commit() -> str:
  """The commit the report was written from (+ a note if the tree had changes), or the
  installed package's version."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    rev = subprocess.run(['git', '-C', here, 'rev-parse', '--short', 'HEAD'],
                         capture_output=True, text=True, check=True).stdout.strip()
    dirty = subprocess.run(['git', '-C', here, 'status', '--porcelain', '--', '..'],
                           capture_output=True, text=True, check=True).stdout.strip()
    return rev + (' (with uncommitted changes)' if dirty else '')
  except (OSError, subprocess.CalledProcessError):
    from importlib import metadata
    try:
      return f'moejax {metadata.version("moejax")} (no git checkout)'
    except metadata.PackageNotFoundError:
      return 'unknown'


def header(exp, workdir: str, results: dict, configs: dict, smoke: bool) -> list[str]:
  """What was measured: units, steps, tokens, evaluation coverage, base config, commit, time."""
  c = next(iter(configs.values()))
  m = c.model
  first = None
  for key in configs:
    path = os.path.join(key.dir(workdir), 'metrics.jsonl')
    if os.path.exists(path):
      first = next((r for r in read_metrics(path) if 'data/val_tokens' in r), None)
      if first:
        break
  everything = [r for by_arm in results.values() for rs in by_arm.values() for r in rs]
  wall = sum(r.get('wall_s', 0.0) for r in everything)
  diverged = sum('diverged' in r for r in everything)
  per_rung = []
  for rung, by_arm in results.items():
    ok = [r for rs in by_arm.values() for r in finished(rs)]
    if not ok:
      continue
    steps = sorted({r['final_step'] for r in ok})
    toks = sorted({r['train_tokens'] for r in ok})
    ev = sorted({r.get('eval_tokens') for r in ok if r.get('eval_tokens')})
    per_rung.append(f"{'`' + rung + '`: ' if rung else ''}{'/'.join(map(str, steps))} steps, "
                    f"{'/'.join(f'{t:,}' for t in toks)} training tokens per run, evaluated on "
                    f"{'/'.join(f'{e:,}' for e in ev) or '-'} tokens")
  split = (f"the validation split holds {first['data/val_tokens']:,} tokens in "
           f"{first['data/val_docs']:,} documents" if first else 'the validation split')
  unit = ('nats per byte (the byte tokenizer: a token is a byte)' if
          c.data.tokenizer == 'bytes' and c.data.source != 'prepared' else 'nats per token')
  return [
      f'# {exp.name}' + (' (smoke size: not a result)' if smoke else ''), '',
      f'- Units: val loss is the mean cross-entropy in {unit}, bits/byte its bits per byte of '
      'text; "eval SE" the standard error of one run\'s val loss over its evaluation '
      'sequences (mean over seeds).',
      '- Runs: ' + '; '.join(per_rung) + f' ({split}; val loss is the final evaluation, '
      f'`train.final_eval_batches`={c.train.final_eval_batches}: 0 is the whole split).',
      f'- Base config: d_model {m.d_model}, {m.num_layers} layers ({len(moe_layer_ids(m))} MoE), '
      f'{m.moe.num_experts} experts of width {m.moe.expert_ffn_dim}, K={m.moe.num_experts_per_tok}'
      f', batch {c.train.batch_size} x {c.data.seq_len} tokens, data `{c.data.source}`, dtype '
      f'{m.dtype}; each arm\'s overrides are listed under "Arms".',
      *_tasks_line(exp, everything),
      f'- Report written at commit {commit()}; runs trained at '
      f"{', '.join(sorted({r.get('commit', 'an unrecorded commit') for r in everything}))}; "
      f'wall time of the runs {wall / 60:.1f} min (their last sessions)'
      + (f'; {diverged} run(s) diverged and are counted, not averaged' if diverged else '') + '.',
      '']


def _tasks_line(exp, everything: list[dict]) -> list[str]:
  """What the task columns measured: which tasks, how many documents, how many shots."""
  spec = exp.tasks
  if spec is None:
    return []
  parts = []
  for name in spec.names:
    docs = sorted({int(r[tasks.key(name, 'documents')]) for r in everything
                   if r.get(tasks.key(name, 'documents')) is not None})
    parts.append(f"`{name}` ({'/'.join(map(str, docs)) or 'no'} documents)")
  shots = 'its own number of' if spec.num_fewshot is None else str(spec.num_fewshot)
  return [f"- Tasks: {', '.join(parts)}, each run's final checkpoint scored by lm-eval "
          f'(`python -m moejax.evaluate`; {shots} few-shot examples); the columns are '
          "lm-eval's metrics of each task, mean ± std over seeds (of a multiple-choice task, acc "
          'is the share of documents whose right answer has the highest log-likelihood, '
          'acc_norm the same per byte of each answer).']


def write(exp, workdir: str, results: dict, configs: dict, smoke: bool,
          designs: dict | None = None) -> str:
  """results {rung or None: {arm: [result per seed]}}, configs {RunKey: config}, designs
  {rung or None: sequential.Design} where seeds were added until decided."""
  designs = designs or {}
  arms = list(dict.fromkeys(k.arm for k in configs))
  lines = header(exp, workdir, results, configs, smoke)
  made = []
  for rung, by_arm in results.items():
    if rung:
      lines += [f'## Rung `{rung}`', '']
    lines += [table(exp, by_arm, arms), '']
    if exp.baseline and exp.baseline in by_arm:
      diff = differences(exp, by_arm, configs, rung, arms, smoke, designs.get(rung))
      if diff:
        lines += ['### Differences' if rung else '## Differences', '', diff, '']
  if exp.rungs and len(results) > 1:
    text, made = ladder_section.ladder(exp, workdir, results, configs, arms, smoke)
    lines += [text, '']
  top = list(results)[-1]  # the curves of the largest rung (the only one without a ladder)
  seeds = sorted({k.seed for k in configs if k.rung == top})
  layers = {a: moe_layer_ids(next(c for k, c in configs.items() if k.arm == a and k.rung == top
                                  ).model) for a in arms}
  flat = [a for a in arms if next(c for k, c in configs.items() if k.arm == a and k.rung == top
                                   ).model.moe.router.name == 'expert_choice']
  made += [
      plots.band_plot(workdir, arms, seeds, 'eval/loss', plots.LOSS_LABEL, 'loss_curves.png',
                      'Validation loss (periodic sample)', top),
      plots.band_plot(workdir, arms, seeds, 'eval/bpb', 'validation bits per byte',
                      'bpb_curves.png', 'Validation bits per byte', top),
      plots.band_plot(workdir, arms, seeds, 'moe/max_vio', 'MaxVio (batch)', 'max_vio.png',
                      'Load imbalance over training', top, logy=True),
      plots.per_layer_vio(workdir, arms, seeds, layers, top),
      plots.load_heatmaps(workdir, arms, seeds[0], layers, flat, top),
      plots.active_experts(workdir, arms, seeds, top),
  ]
  lines += ['## Arms', '']
  for arm in arms:
    spec = exp.arm(arm)
    extra = (f' (upcycled from `{spec.upcycle_from}` at {spec.upcycle_at:g} of the steps, '
             f'mode {spec.upcycle_mode})' if spec.upcycle_from else '')
    lines.append(f'- `{arm}`: `{spec.overrides}`{extra}')
  for name in exp.rungs:
    ran = sorted({c.train.steps for k, c in configs.items() if k.rung == name})
    lines.append(f'- rung `{name}`: `{exp.rung(name).overrides}`' + (
        f" (these smoke runs: train.steps={'/'.join(map(str, ran))})" if smoke else ''))
  for name in exp.post_evals:
    pe = exp.post_eval(name)
    lines.append(f'- post-evaluation `{name}` (column `{name} loss`): `{pe.overrides}`' +
                 (f" on {', '.join(pe.arms)}" if pe.arms else ''))
  lines += [''] + [f'![{p}]({p})' for p in made if p]
  if exp.note:
    lines += ['', '## Literature', '', exp.note.strip()]
  path = os.path.join(workdir, 'results.md')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return path
