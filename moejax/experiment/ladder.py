"""The compute ladder section of a report: loss against training FLOPs per arm, the gap to the
baseline per rung and its trend per decade of compute, the compute multipliers
(multipliers.py), and what each arm is at each rung (FLOPs per token, active and total
parameters)."""
from __future__ import annotations

import math

import numpy as np

from moejax.experiment import plots, statistics
from moejax.experiment.pairing import aligned, comparisons, finished


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
    pts = [(np.mean([r['train_flops'] for r in finished(results[r].get(arm, []))]),
            [x['val_loss'] for x in finished(results[r].get(arm, []))]) for r in rungs
           if finished(results[r].get(arm, []))]
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
      flops = np.mean([v['train_flops'] for v in finished(results[r][arm])])
      x.append(flops)
      d.append(c.diff)
      lo95, hi95 = c.interval(statistics.LEVEL)  # the plot's bars: 95%, uncorrected
      low.append(lo95)
      high.append(hi95)
      paired &= c.paired
      a, b, _ = aligned(results[r], configs, r, arm, exp.baseline, 'val_loss')
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
  mults, mult_lines = compute_multipliers(exp, results, configs, rungs, arms)
  if mults:
    made.append(plots.ladder_multipliers(workdir, mults, exp.baseline))
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
  lines += mult_lines + [''] + sizes(configs, rungs, arms)
  return '\n'.join(lines), [m for m in made if m]


def compute_multipliers(exp, results: dict, configs: dict, rungs: list, arms) -> tuple:
  """({arm: [Multiplier per rung]}, the report's lines): each arm against the baseline, from
  the local log-linear fit of loss on log10 training FLOPs (multipliers.py says why)."""
  from moejax.experiment import multipliers
  out, rows = {}, []
  for arm in arms:
    if arm == exp.baseline:
      continue
    data, paired, names = [], True, []
    for r in rungs:
      a, b, pair = aligned(results[r], configs, r, arm, exp.baseline, 'val_loss')
      if not a or not b:
        continue
      flops = np.mean([v['train_flops'] for v in finished(results[r][exp.baseline])])
      data.append((flops, b, a))
      paired &= pair
      names.append(r)
    if len({f for f, _, _ in data}) < 2:
      continue
    out[arm] = multipliers.compute_multipliers(data, paired)
    cells = {r: m for r, m in zip(names, out[arm])}
    rows.append(f'| {arm} | ' + ' | '.join(
        f'{multipliers.describe(cells[r].value)} [{multipliers.describe(cells[r].low)}, '
        f'{multipliers.describe(cells[r].high)}]' + (' (extrapolated)' if cells[r].extrapolated
                                                    else '') if r in cells else '-'
        for r in rungs) + ' |')
  if not rows:
    return out, []
  return out, [
      '', f'Compute multipliers: the training compute each arm needs to reach `{exp.baseline}`\'s '
      'loss at each rung, as a multiple of the rung\'s compute (below 1: the arm needs less), '
      'from a local log-linear fit of val loss on log10 training FLOPs per arm (least squares '
      'over every seed of every rung; over one decade of compute the power law\'s irreducible '
      'term is not identified, see moejax/experiment/multipliers.py), with a 95% interval by '
      'bootstrap over seeds (paired where the arms pair); "never": the arm\'s loss does not '
      'fall with compute in that share of resamples; "extrapolated": the arm reaches the loss '
      'outside the ladder\'s compute.', '',
      '| arm | ' + ' | '.join(f'at {r}' for r in rungs) + ' |', '|---' * (len(rungs) + 1) + '|'
  ] + rows


def sizes(configs: dict, rungs: list, arms) -> list[str]:
  """Per rung and arm: forward FLOPs per token, active and total parameters (what the scaling
  laws of MoE compare arms by)."""
  from moejax.costs.flops import flops_per_token
  from moejax.costs.parameters import count_params
  lines = ['What each arm is at each rung: forward FLOPs per token (at its sequence length; '
           'training is 3x), parameters a token activates and parameters in all '
           '(moejax/costs/).', '', '| rung | arm | FLOPs per token | active parameters | '
           'total parameters |', '|---|---|---|---|---|']
  for r in rungs:
    for arm in arms:
      c = next((c for k, c in configs.items() if k.rung == r and k.arm == arm), None)
      if c is None:
        continue
      n = count_params(c.model)
      lines.append(f"| {r} | {arm} | {flops_per_token(c.model, c.data.seq_len)['forward']:.3g} "
                   f"| {n['active']:,} | {n['total']:,} |")
  return lines


def _flops(results: dict) -> str:
  vals = [r['train_flops'] for rs in results.values() for r in finished(rs) if 'train_flops' in r]
  return f'{np.mean(vals):.3g}' if vals else '-'


def _seeds(results: dict) -> str:
  return '/'.join(sorted({str(len(rs)) for rs in results.values()}))
