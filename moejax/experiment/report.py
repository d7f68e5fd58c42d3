"""An experiment's report: DIR/results.md and the plots (plots.py), from the runs' result.json
and metrics.jsonl files.

results.md says what was measured (units, steps, training and evaluation tokens, the base
config, the commit, the wall time), then per rung of the ladder (or once, without one) a table
of every arm (mean ± std over seeds) and the comparison of each arm with the baseline: paired
by seed where the two arms can pair (same seeds, same parameter shapes and data order), else as
independent samples, with a bootstrap interval, the t-test, Holm's correction over the arms,
the two one-sided tests of equivalence within the experiment's margin delta, the minimum
detectable effect and the seeds that would detect delta, and a verdict (statistics.py). With a
ladder, the loss against training FLOPs and the slope of each gap against log-compute.
"""
from __future__ import annotations

import math
import os
import subprocess

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax.experiment import plots, statistics
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


def _ok(results: list[dict]) -> list[dict]:
  return [r for r in results if 'diverged' not in r]


def table(exp, results: dict, arms) -> str:
  """One row per arm: mean ± std over its seeds that finished; diverged runs counted."""
  cols = list(BASE_COLUMNS) + [(k, k) for k in exp.columns] + [
      (f'{k}/loss', f'{k} loss') for k in exp.post_evals]
  lines = ['| arm | seeds | ' + ' | '.join(title for _, title in cols) + ' |',
           '|---' * (len(cols) + 2) + '|']
  for arm in arms:
    rs = results.get(arm, [])
    ok = _ok(rs)
    seeds = f'{len(ok)}' + (f' ({len(rs) - len(ok)} diverged)' if len(ok) < len(rs) else '')
    lines.append(f'| {arm} | {seeds} | ' + ' | '.join(_fmt([r.get(k) for r in ok])
                                                     for k, _ in cols) + ' |')
  return '\n'.join(lines)


_SHAPES: dict = {}


def _param_shapes(model_cfg) -> tuple:
  """The parameter tree's paths and shapes (jax.eval_shape: nothing allocated)."""
  from moejax.model.transformer import Transformer
  key = str(model_cfg)
  if key not in _SHAPES:
    model = Transformer(ml_collections.FrozenConfigDict(model_cfg))
    tree = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
    _SHAPES[key] = tuple((jax.tree_util.keystr(p), tuple(getattr(v, 'value', v).shape))
                         for p, v in jax.tree_util.tree_leaves_with_path(
                             tree, is_leaf=lambda x: hasattr(x, 'value')))
  return _SHAPES[key]


def pairable(configs: dict, rung, arm: str, base: str) -> bool:
  """Whether two arms' runs pair by seed: the same seeds, the same parameter shapes (so the
  same initial parameters) and the same data order (data section, batch size)."""
  mine = {k.seed: c for k, c in configs.items() if k.rung == rung and k.arm == arm}
  theirs = {k.seed: c for k, c in configs.items() if k.rung == rung and k.arm == base}
  if not mine or set(mine) != set(theirs):
    return False
  a, b = next(iter(mine.values())), next(iter(theirs.values()))
  return (a.data.to_dict() == b.data.to_dict() and a.train.batch_size == b.train.batch_size
          and _param_shapes(a.model) == _param_shapes(b.model))


def _aligned(results: dict, configs: dict, rung, arm: str, base: str, key: str):
  """(arm values, baseline values, paired) of a metric over the seeds both finished."""
  seeds = lambda a: [k.seed for k in configs if k.rung == rung and k.arm == a]  # noqa: E731
  va = dict(zip(seeds(arm), results.get(arm, [])))
  vb = dict(zip(seeds(base), results.get(base, [])))
  paired = pairable(configs, rung, arm, base)
  if paired:
    common = [s for s in va if s in vb and 'diverged' not in va[s] and 'diverged' not in vb[s]
              and va[s].get(key) is not None and vb[s].get(key) is not None]
    return [va[s][key] for s in common], [vb[s][key] for s in common], True
  ok = lambda d: [r[key] for r in d.values() if 'diverged' not in r and r.get(key) is not None]  # noqa: E731,E501
  return ok(va), ok(vb), False


def comparisons(exp, results: dict, configs: dict, rung, arms, key: str = 'val_loss') -> dict:
  """{arm: statistics.Comparison} of each arm against the baseline, with verdicts."""
  out = {}
  for arm in arms:
    if arm == exp.baseline:
      continue
    a, b, paired = _aligned(results, configs, rung, arm, exp.baseline, key)
    if min(len(a), len(b)) >= 2:
      out[arm] = statistics.compare(a, b, exp.delta, paired)
  return statistics.verdicts(out)


def _p(p: float) -> str:
  return '-' if p is None or math.isnan(p) else f'{p:.2g}'


def differences(exp, results: dict, configs: dict, rung, arms, smoke: bool = False) -> str:
  """The comparison table of each arm with the baseline (primary metric: val loss); a smoke
  run's has no verdicts (a few steps decide nothing)."""
  comps = comparisons(exp, results, configs, rung, arms)
  if not comps:
    return ''
  lines = [f'Against `{exp.baseline}`, on val loss (nats; equivalence margin delta = '
           f'{exp.delta:g}): the mean difference [95% bootstrap interval], the two-sided t-test '
           "(paired by seed, or Welch's when the arms cannot pair) and its p after Holm's "
           'correction over the arms, the two one-sided tests of |difference| < delta after '
           'Holm, the smallest difference these seeds detect with 80% power (MDE), the seeds '
           'that would detect delta, and the verdict.', '',
           '| arm | pairing | seeds | difference [95% CI] | p | p (Holm) | TOST p (Holm) | MDE | '
           'seeds for delta | verdict |', '|---' * 10 + '|']
  for arm, c in comps.items():
    lines.append(
        f"| {arm} | {'paired' if c.paired else 'unpaired'} | {c.n} | {c.diff:+.4f} "
        f'[{c.low:+.4f}, {c.high:+.4f}] | {_p(c.p)} | {_p(c.p_holm)} | {_p(c.p_tost_holm)} | '
        f'{c.mde:.4f} | {c.seeds_needed:.0f} | '
        + ('none (smoke size)' if smoke else f'**{c.verdict}**') + ' |')
  rows = []
  for key, title in SECONDARY:
    for arm in arms:
      if arm == exp.baseline:
        continue
      a, b, paired = _aligned(results, configs, rung, arm, exp.baseline, key)
      if min(len(a), len(b)) >= 2:
        c = statistics.compare(a, b, math.inf, paired)
        rows.append(f'| {title} | {arm} | {c.diff:+.4f} [{c.low:+.4f}, {c.high:+.4f}] | '
                    f'{_p(c.p)} |')
  if rows:
    lines += ['', 'Other metrics against the baseline (difference [95% CI], t-test p, not '
              'corrected):', '', '| metric | arm | difference [95% CI] | p |',
              '|---|---|---|---|'] + rows
  return '\n'.join(lines)


def _ols(x, y, extra=None):
  """statsmodels OLS of y on [1, x (, extra columns)]: the fitted model."""
  import statsmodels.api as sm
  cols = [np.asarray(x, float)] + ([np.asarray(e, float) for e in extra] if extra else [])
  return sm.OLS(np.asarray(y, float), sm.add_constant(np.column_stack(cols))).fit()


def ladder(exp, workdir: str, results: dict, configs: dict, arms,
           smoke: bool = False) -> tuple[str, list]:
  """The compute ladder: loss against training FLOPs per arm (fit on log10 FLOPs), the gap
  to the baseline per rung, and the slope of the gap against log10 compute with its interval."""
  rungs = [r for r in exp.rungs if r in results]
  points, fits, gaps, rows = {}, {}, {}, []
  for arm in arms:
    pts = [(np.mean([r['train_flops'] for r in _ok(results[r].get(arm, []))]),
            [x['val_loss'] for x in _ok(results[r].get(arm, []))]) for r in rungs
           if _ok(results[r].get(arm, []))]
    if not pts:
      continue
    points[arm] = pts
    xs = [math.log10(f) for f, v in pts for _ in v]
    ys = [y for _, v in pts for y in v]
    if len(set(xs)) > 1:
      fit = _ols(xs, ys)
      fits[arm] = (float(fit.params[0]), float(fit.params[1]))
  for arm in arms:
    if arm == exp.baseline or arm not in points:
      continue
    x, d, low, high, logc, dd, paired = [], [], [], [], [], [], True
    for r in rungs:
      c = comparisons(exp, results[r], configs, r, [arm]).get(arm)
      if c is None:
        continue
      flops = np.mean([v['train_flops'] for v in _ok(results[r][arm])])
      x.append(flops)
      d.append(c.diff)
      low.append(c.low)
      high.append(c.high)
      paired &= c.paired
      a, b, _ = _aligned(results[r], configs, r, arm, exp.baseline, 'val_loss')
      if c.paired:
        logc += [math.log10(flops)] * len(a)
        dd += [u - w for u, w in zip(a, b)]
      else:
        logc += [math.log10(flops)] * (len(a) + len(b))
        dd += [(u, 1) for u in a] + [(w, 0) for w in b]
    if len(set(x)) < 2:
      continue
    if paired:
      fit = _ols(logc, dd)
      slope, (lo, hi) = float(fit.params[1]), fit.conf_int(0.05)[1]
      line = (float(fit.params[0]), slope)
    else:  # y ~ 1 + logC + arm + arm x logC: the interaction is the gap's slope
      y = [v for v, _ in dd]
      is_arm = np.asarray([g for _, g in dd], float)
      fit = _ols(logc, y, [is_arm, is_arm * np.asarray(logc)])
      slope, (lo, hi) = float(fit.params[3]), fit.conf_int(0.05)[3]
      line = (float(fit.params[2]), slope)
    gaps[arm] = (x, d, low, high, line)
    mean_gap = float(np.mean(d))
    if smoke:
      trend = 'none (smoke size)'
    elif lo > 0 or hi < 0:
      trend = 'the gap grows' if np.sign(slope) == np.sign(mean_gap) else 'the gap shrinks'
    else:
      trend = 'no trend detected (the interval includes 0)'
    rows.append(f"| {arm} | {'paired' if paired else 'unpaired'} | "
                + ' | '.join(f'{v:+.4f}' for v in d) + f' | {slope:+.4f} [{lo:+.4f}, {hi:+.4f}] '
                f'| {trend} |')
  made = [plots.ladder_loss(workdir, points, fits)]
  if gaps:
    made.append(plots.ladder_gap(workdir, gaps, exp.baseline))
  lines = ['## The compute ladder', '',
           'Rungs: ' + ', '.join(f'`{r}` ({_flops(results[r])} training FLOPs per run, '
                                 f'{_seeds(results[r])} seeds)' for r in rungs) + '.', '']
  if rows:
    lines += [f'The gap to `{exp.baseline}` in val loss at each rung, and its slope per decade '
              'of training compute (OLS over the seeds of every rung; paired: of the per-seed '
              'differences; unpaired: the interaction of arm and log-compute) with its 95% '
              'interval.', '',
              '| arm | pairing | ' + ' | '.join(f'gap at {r}' for r in rungs) +
              ' | slope per decade [95% CI] | trend |', '|---' * (len(rungs) + 4) + '|'] + rows
  return '\n'.join(lines), [m for m in made if m]


def _flops(results: dict) -> str:
  vals = [r['train_flops'] for rs in results.values() for r in _ok(rs) if 'train_flops' in r]
  return f'{np.mean(vals):.3g}' if vals else '-'


def _seeds(results: dict) -> str:
  return '/'.join(sorted({str(len(rs)) for rs in results.values()}))


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
    ok = [r for rs in by_arm.values() for r in _ok(rs)]
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
      f'- Report written at commit {commit()}; runs trained at '
      f"{', '.join(sorted({r.get('commit', 'an unrecorded commit') for r in everything}))}; "
      f'wall time of the runs {wall / 60:.1f} min (their last sessions)'
      + (f'; {diverged} run(s) diverged and are counted, not averaged' if diverged else '') + '.',
      '']


def write(exp, workdir: str, results: dict, configs: dict, smoke: bool) -> str:
  """results {rung or None: {arm: [result per seed]}}, configs {RunKey: config}."""
  arms = list(dict.fromkeys(k.arm for k in configs))
  lines = header(exp, workdir, results, configs, smoke)
  made = []
  for rung, by_arm in results.items():
    if rung:
      lines += [f'## Rung `{rung}`', '']
    lines += [table(exp, by_arm, arms), '']
    if exp.baseline and exp.baseline in by_arm:
      diff = differences(exp, by_arm, configs, rung, arms, smoke)
      if diff:
        lines += ['### Differences' if rung else '## Differences', '', diff, '']
  if exp.rungs and len(results) > 1:
    text, made = ladder(exp, workdir, results, configs, arms, smoke)
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
