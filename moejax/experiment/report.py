"""An experiment's report: DIR/results.md (mean +/- std over seeds) and DIR/*.png plots, read
from the runs' result.json and metrics.jsonl files."""
from __future__ import annotations

import math
import os

import numpy as np

from moejax.training.metrics import read_metrics

BASE_COLUMNS = (('val_loss', 'val loss'), ('val_bpb', 'val bits/byte'),
                ('max_vio_global', 'MaxVio global'),
                ('dropped_fraction', 'dropped'), ('tokens_per_sec', 'tokens/s'))


def _fmt(values) -> str:
  vals = [v for v in values if v is not None]
  if not vals:
    return '-'
  if isinstance(vals[0], (list, tuple)):  # per layer: mean of each layer, ' / ' separated
    return ' / '.join(_fmt([v[i] for v in vals]) for i in range(len(vals[0])))
  a = np.asarray(vals, dtype=float)
  digits = 0 if abs(a.mean()) >= 100 else 3
  std = f' ± {a.std(ddof=1):.{digits}f}' if len(a) > 1 else ''
  return f'{a.mean():.{digits}f}{std}'


def table(exp, results: dict, arms) -> str:
  cols = list(BASE_COLUMNS) + [(k, k) for k in exp.columns] + [
      (f'{k}/loss', f'{k} loss') for k in exp.post_evals]
  lines = ['| arm | ' + ' | '.join(title for _, title in cols) + ' |',
           '|---' * (len(cols) + 1) + '|']
  for arm in arms:
    rs = results.get(arm, [])
    lines.append(f'| {arm} | ' + ' | '.join(_fmt([r.get(k) for r in rs]) for k, _ in cols) +
                 ' |')
  return '\n'.join(lines)


def bootstrap_interval(a, b, reps: int = 10_000, seed: int = 0, level: float = 0.95):
  """(mean(a) - mean(b), low, high): the percentile bootstrap interval of the difference of
  means, resampling each arm's seeds with replacement (numpy only, seeded)."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  rng = np.random.default_rng(seed)
  diffs = (rng.choice(a, (reps, len(a))).mean(1) - rng.choice(b, (reps, len(b))).mean(1))
  tail = (1 - level) / 2 * 100
  return float(a.mean() - b.mean()), *(float(x) for x in np.percentile(diffs, [tail, 100 - tail]))


def _betainc(a: float, b: float, x: float) -> float:
  """The regularised incomplete beta function I_x(a, b), by its continued fraction (modified
  Lentz), using I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction converges slowly."""
  if x <= 0 or x >= 1:
    return float(x >= 1)
  if x > (a + 1) / (a + b + 2):
    return 1.0 - _betainc(b, a, 1.0 - x)
  front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) +
                   b * math.log1p(-x)) / a
  tiny = 1e-300
  f, c, d = tiny, tiny, 0.0
  for i in range(400):
    m = i // 2
    if i == 0:
      num = 1.0
    elif i % 2:
      num = -((a + m) * (a + b + m) * x) / ((a + 2 * m) * (a + 2 * m + 1))
    else:
      num = (m * (b - m) * x) / ((a + 2 * m - 1) * (a + 2 * m))
    d = 1.0 + num * d
    d = 1.0 / (d if abs(d) > tiny else tiny)
    c = 1.0 + num / (c if abs(c) > tiny else tiny)
    f *= c * d
    if abs(c * d - 1.0) < 1e-14:
      break
  return front * f


def welch_test(a, b) -> tuple[float, float, float]:
  """Welch's t-test of mean(a) = mean(b) (unequal variances): (t, degrees of freedom, the
  two-sided p-value from Student's t distribution, P(|T| > |t|) = I_{df/(df+t^2)}(df/2, 1/2))."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
  diff = a.mean() - b.mean()
  if va + vb == 0:
    return (math.copysign(math.inf, diff) if diff else 0.0), math.inf, float(diff == 0)
  t = diff / math.sqrt(va + vb)
  df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
  return float(t), float(df), _betainc(df / 2, 0.5, df / (df + t * t))


COMPARED = (('val_loss', 'val loss'), ('val_bpb', 'val bits/byte'),
            ('max_vio_global', 'MaxVio global'))


def compare(exp, results: dict, arms) -> str:
  """Each arm against exp.baseline: difference of means [95% bootstrap interval], Welch's
  t-test p-value, and '*' when the interval excludes 0 and p < 0.05. Empty when there is no
  baseline or under 2 seeds."""
  base = results.get(exp.baseline, [])
  if not exp.baseline or len(base) < 2:
    return ''
  lines = [f'Against `{exp.baseline}`: difference of means over seeds [95% bootstrap interval] '
           "and the two-sided p-value of Welch's t-test; * marks a difference both support "
           '(the interval excludes 0 and p < 0.05). With few seeds the percentile interval is '
           'narrow-biased, which is why the t-test must agree.', '',
           '| arm | ' + ' | '.join(t for _, t in COMPARED) + ' |',
           '|---' * (len(COMPARED) + 1) + '|']
  for arm in arms:
    if arm == exp.baseline or len(results.get(arm, [])) < 2:
      continue
    cells = []
    for key, _ in COMPARED:
      a = [r.get(key) for r in results[arm]]
      b = [r.get(key) for r in base]
      if None in a or None in b:
        cells.append('-')
        continue
      d, low, high = bootstrap_interval(a, b)
      p = welch_test(a, b)[2]
      star = ' *' if (low > 0 or high < 0) and p < 0.05 else ''
      cells.append(f'{d:+.4f} [{low:+.4f}, {high:+.4f}] p={p:.2g}{star}')
    lines.append(f'| {arm} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _runs(workdir, arm, seeds):
  out = []
  for s in seeds:
    path = os.path.join(workdir, arm, f'seed_{s}', 'metrics.jsonl')
    if os.path.exists(path):
      out.append(read_metrics(path))
  return out


def _curve(runs, key):
  """(steps, [seeds, steps] values) over the steps every run logged `key` at."""
  per_run = [{r['step']: r[key] for r in rows if key in r} for rows in runs]
  if not per_run or not all(per_run):
    return None, None
  steps = sorted(set.intersection(*(set(d) for d in per_run)))
  return np.asarray(steps), np.asarray([[d[s] for s in steps] for d in per_run], dtype=float)


def _band_plot(plt, workdir, arms, seeds, key, ylabel, filename, title, logy=False):
  fig, ax = plt.subplots(figsize=(7, 4.2))
  drawn = False
  for arm in arms:
    steps, vals = _curve(_runs(workdir, arm, seeds), key)
    if steps is None or not len(steps):
      continue
    mean, std = vals.mean(0), vals.std(0)
    ax.plot(steps, mean, label=arm)
    ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    drawn = True
  if not drawn:
    plt.close(fig)
    return None
  ax.set_xlabel('step')
  ax.set_ylabel(ylabel)
  if logy:  # symlog: expert choice's MaxVio is exactly 0
    ax.set_yscale('symlog', linthresh=1e-2)
  ax.set_title(title + f' (mean ± std over {len(seeds)} seeds)', fontsize='medium')
  ax.legend(fontsize='small')
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, filename), dpi=100)
  plt.close(fig)
  return filename


def _load_heatmaps(plt, workdir, arms, seed):
  loads = {}
  for arm in arms:
    runs = _runs(workdir, arm, [seed])
    rows = [r for r in runs[0] if 'moe/expert_load' in r] if runs else []
    if rows:
      loads[arm] = (np.asarray([r['step'] for r in rows]),
                    np.asarray([r['moe/expert_load'] for r in rows]))  # [steps, layers, N]
  if not loads:
    return None
  layers = max(v[1].shape[1] for v in loads.values())
  fig, axes = plt.subplots(len(loads), layers, figsize=(3.2 * layers + 1, 1.9 * len(loads) + 0.8),
                           squeeze=False, sharex=True)
  for i, (arm, (steps, load)) in enumerate(loads.items()):
    n = load.shape[2]
    for j in range(layers):
      ax = axes[i, j]
      if j >= load.shape[1]:
        ax.axis('off')
        continue
      ax.imshow(load[:, j, :].T * n, aspect='auto', origin='lower', cmap='magma', vmin=0, vmax=3,
                extent=(steps[0], max(steps[-1], steps[0] + 1), -0.5, n - 0.5),
                interpolation='nearest')
      ax.set_title(f'{arm}: MoE layer {j}', fontsize='small')
      if j == 0:
        ax.set_ylabel('expert')
  fig.suptitle(f'Expert load per layer over training, seed {seed} (colour: load / uniform, '
               '0 to 3)', fontsize='medium')
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'expert_load.png'), dpi=90)
  plt.close(fig)
  return 'expert_load.png'


def _per_layer_vio(plt, workdir, arms, seeds):
  data = {}
  for arm in arms:
    steps, vals = _curve(_runs(workdir, arm, seeds), 'moe/per_layer/max_vio')
    if steps is not None and len(steps):
      data[arm] = (steps, vals.mean(0))  # [steps, layers]
  if not data:
    return None
  fig, axes = plt.subplots(1, len(data), figsize=(4 * len(data), 3.4), squeeze=False,
                           sharey=True)
  for ax, (arm, (steps, vio)) in zip(axes[0], data.items()):
    for j in range(vio.shape[1]):
      ax.plot(steps, vio[:, j], label=f'MoE layer {j}')
    ax.set_title(arm, fontsize='small')
    ax.set_xlabel('step')
    ax.set_yscale('symlog', linthresh=1e-2)
  axes[0, 0].set_ylabel('MaxVio (batch), mean over seeds')
  axes[0, 0].legend(fontsize='x-small')
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'max_vio_per_layer.png'), dpi=90)
  plt.close(fig)
  return 'max_vio_per_layer.png'


def _active_experts(plt, workdir, arms, seeds):
  """Routed experts per token: the mean over training (left) and, at the last log, the share
  of tokens using 0, 1, .. K experts (right; mean over MoE layers and seeds). Drawn when some
  arm's number varies by token."""
  curves, hists = {}, {}
  for arm in arms:
    runs = _runs(workdir, arm, seeds)
    last = [[r for r in rows if 'moe/active_experts_hist' in r] for rows in runs]
    if not runs or not all(last):
      continue
    hist = np.mean([np.mean(rows[-1]['moe/active_experts_hist'], axis=0) for rows in last], 0)
    hists[arm] = hist
    curves[arm] = _curve(runs, 'moe/active_experts')
  if not any(np.count_nonzero(h > 1e-9) > 1 for h in hists.values()):
    return None
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  for arm, (steps, vals) in curves.items():
    left.plot(steps, vals.mean(0), label=arm)
    left.fill_between(steps, vals.mean(0) - vals.std(0), vals.mean(0) + vals.std(0), alpha=0.2)
  left.set_xlabel('step')
  left.set_ylabel('routed experts per token (mean)')
  left.legend(fontsize='small')
  most = max(len(h) for h in hists.values())
  width = 0.8 / len(hists)
  for i, (arm, h) in enumerate(hists.items()):
    right.bar(np.arange(len(h)) + (i - (len(hists) - 1) / 2) * width, h, width, label=arm)
  right.set_xticks(range(most))
  right.set_xlabel('routed experts of a token (last log)')
  right.set_ylabel('share of tokens')
  fig.suptitle(f'Experts per token (mean ± std over {len(seeds)} seeds)', fontsize='medium')
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'active_experts.png'), dpi=90)
  plt.close(fig)
  return 'active_experts.png'


def write(exp, workdir: str, results: dict, arms, seeds, smoke: bool) -> str:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  plots = [
      _band_plot(plt, workdir, arms, seeds, 'eval/loss', 'validation loss (nats/token)',
                 'loss_curves.png', 'Validation loss'),
      _band_plot(plt, workdir, arms, seeds, 'eval/bpb', 'validation bits per byte',
                 'bpb_curves.png', 'Validation bits per byte'),
      _band_plot(plt, workdir, arms, seeds, 'moe/max_vio', 'MaxVio (batch)', 'max_vio.png',
                 'Load imbalance over training', logy=True),
      _per_layer_vio(plt, workdir, arms, seeds),
      _load_heatmaps(plt, workdir, arms, seeds[0]),
      _active_experts(plt, workdir, arms, seeds),
  ]
  lines = [f'# {exp.name}' + (' (smoke size: not a result)' if smoke else ''), '',
           f'Seeds: {list(seeds)}. Values are mean ± std over seeds (sample std), at the last '
           'evaluation; "MaxVio global" is measured over the whole validation set, "tokens/s" '
           'is the median training throughput after the first (compiling) interval.', '',
           table(exp, results, arms), '']
  comparison = compare(exp, results, arms)
  if comparison:
    lines += ['## Differences', '', comparison, '']
  lines += ['## Arms', '']
  for arm in arms:
    spec = exp.arm(arm)
    extra = (f' (upcycled from `{spec.upcycle_from}` at {spec.upcycle_at:g} of the steps, '
             f'mode {spec.upcycle_mode})' if spec.upcycle_from else '')
    lines.append(f'- `{arm}`: `{spec.overrides}`{extra}')
  lines += [''] + [f'![{p}]({p})' for p in plots if p]
  if exp.note:
    lines += ['', '## Literature', '', exp.note.strip()]
  path = os.path.join(workdir, 'results.md')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return path
