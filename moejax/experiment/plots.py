"""An experiment's plots, read from its runs' metrics.jsonl files: validation loss and bits per
byte over training, load imbalance over training and per MoE layer, expert load heatmaps,
experts per token; and for a compute ladder, loss against training FLOPs and the gap to the
baseline per rung. Each function draws one PNG into the workdir and returns its file name (None
when there is nothing to draw)."""
from __future__ import annotations

import os

import numpy as np

from moejax.training.metrics import read_metrics

LOSS_LABEL = 'validation loss (nats per token; per byte with the byte tokenizer)'


def pyplot():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def runs(workdir, arm, seeds, rung=None):
  """The metric rows of each seed's run of an arm (at a rung of a ladder)."""
  out = []
  for s in seeds:
    path = os.path.join(workdir, *([rung] if rung else []), arm, f'seed_{s}', 'metrics.jsonl')
    if os.path.exists(path):
      out.append(read_metrics(path))
  return out


def _curve(rows_per_run, key):
  """(steps, [seeds, steps] values) over the steps every run logged `key` at."""
  per_run = [{r['step']: r[key] for r in rows if key in r} for rows in rows_per_run]
  if not per_run or not all(per_run):
    return None, None
  steps = sorted(set.intersection(*(set(d) for d in per_run)))
  return np.asarray(steps), np.asarray([[d[s] for s in steps] for d in per_run], dtype=float)


def _texts(fig):
  """(text, 'width' or 'height': the figure's extent it must fit) of every title and label."""
  out = [(fig._suptitle, 'width')] if fig._suptitle is not None else []
  for ax in fig.axes:
    out += [(ax.title, 'width'), (ax.xaxis.label, 'width'), (ax.yaxis.label, 'height')]
  return [(t, dim) for t, dim in out if t.get_text()]


def outside(fig) -> list[str]:
  """The titles and labels that do not lie wholly inside the drawn figure."""
  fig.canvas.draw()
  box, renderer = fig.bbox, fig.canvas.get_renderer()
  return [t.get_text() for t, _ in _texts(fig)
          if not box.contains(*t.get_window_extent(renderer).p0)
          or not box.contains(*t.get_window_extent(renderer).p1)]


def fit_texts(fig) -> None:
  """Lay the figure out with every title and label inside it: a text longer than the figure
  (or, for a y label, taller) is wrapped onto more lines at word boundaries."""
  import textwrap
  fig.tight_layout()
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  for text, dim in _texts(fig):
    ext = text.get_window_extent(renderer)
    size, room = (ext.width, fig.bbox.width) if dim == 'width' else (ext.height, fig.bbox.height)
    ax = text.axes
    if ax is not None and text is ax.title:
      room = min(room, ax.bbox.width * 1.15)  # a panel's title stays above its panel
    if size > 0.92 * room:
      line = text.get_text().replace('\n', ' ')
      text.set_text(textwrap.fill(line, max(12, int(len(line) * 0.9 * room / size))))
  fig.tight_layout()


def _save(plt, fig, workdir, filename, dpi=100):
  fit_texts(fig)
  fig.savefig(os.path.join(workdir, filename), dpi=dpi)
  plt.close(fig)
  return filename


def band_plot(workdir, arms, seeds, key, ylabel, filename, title, rung=None, logy=False):
  """Mean ± std over seeds of a logged metric against the step, one line per arm."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.2))
  drawn = False
  for arm in arms:
    steps, vals = _curve(runs(workdir, arm, seeds, rung), key)
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
  where = f', rung {rung}' if rung else ''
  ax.set_title(f'{title} (mean ± std over {len(seeds)} seeds{where})', fontsize='medium')
  ax.legend(fontsize='small')
  return _save(plt, fig, workdir, filename)


def load_heatmaps(workdir, arms, seed, layer_ids: dict, flat_arms=(), rung=None):
  """Each arm's expert load per MoE layer over training (seed `seed`); layer_ids {arm: its MoE
  layers as the model counts them}. flat_arms: arms whose load is equal by construction
  (expert choice), said so on their row."""
  plt = pyplot()
  loads = {}
  for arm in arms:
    rows = runs(workdir, arm, [seed], rung)
    rows = [r for r in rows[0] if 'moe/expert_load' in r] if rows else []
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
      name = layer_ids[arm][j] if j < len(layer_ids[arm]) else j
      flat = ' (equal by construction)' if arm in flat_arms else ''
      ax.set_title(f'{arm}: layer {name}{flat}', fontsize='small')
      if j == 0:
        ax.set_ylabel('expert')
  fig.suptitle(f'Expert load per MoE layer over training, seed {seed} (colour: load / uniform, '
               '0 to 3)', fontsize='medium')
  return _save(plt, fig, workdir, 'expert_load.png', dpi=90)


def per_layer_vio(workdir, arms, seeds, layer_ids: dict, rung=None):
  """MaxVio (batch) of each MoE layer over training, mean over seeds, one panel per arm, each
  with its own legend: layer_ids {arm: its MoE layers as the model counts them} (arms may
  differ in which layers are MoE)."""
  plt = pyplot()
  data = {}
  for arm in arms:
    steps, vals = _curve(runs(workdir, arm, seeds, rung), 'moe/per_layer/max_vio')
    if steps is not None and len(steps):
      data[arm] = (steps, vals.mean(0))  # [steps, layers]
  if not data:
    return None
  fig, axes = plt.subplots(1, len(data), figsize=(4 * len(data), 3.4), squeeze=False,
                           sharey=True)
  for ax, (arm, (steps, vio)) in zip(axes[0], data.items()):
    ids = layer_ids[arm]
    for j in range(vio.shape[1]):
      ax.plot(steps, vio[:, j], label=f'layer {ids[j] if j < len(ids) else j}')
    ax.set_title(arm, fontsize='small')
    ax.set_xlabel('step')
    ax.set_yscale('symlog', linthresh=1e-2)
    ax.legend(fontsize='x-small')
  axes[0, 0].set_ylabel('MaxVio (batch), mean over seeds')
  return _save(plt, fig, workdir, 'max_vio_per_layer.png', dpi=90)


def active_experts(workdir, arms, seeds, rung=None):
  """Routed experts per token: the mean over training (left) and, at the last log, the share
  of tokens using 0, 1, .. K experts (right; mean over MoE layers and seeds). Drawn when some
  arm's number varies by token."""
  plt = pyplot()
  curves, hists = {}, {}
  for arm in arms:
    rows_per_run = runs(workdir, arm, seeds, rung)
    last = [[r for r in rows if 'moe/active_experts_hist' in r] for rows in rows_per_run]
    if not rows_per_run or not all(last):
      continue
    hists[arm] = np.mean([np.mean(rows[-1]['moe/active_experts_hist'], axis=0)
                          for rows in last], 0)
    curves[arm] = _curve(rows_per_run, 'moe/active_experts')
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
  return _save(plt, fig, workdir, 'active_experts.png', dpi=90)


def ladder_loss(workdir, points: dict, fits: dict, metric_label: str = LOSS_LABEL):
  """Loss against training FLOPs (log axis): points {arm: [(flops, [values over seeds])]} as
  the mean with a ± std band over seeds, fits {arm: (intercept, slope)} of loss on log10 FLOPs
  drawn as dashed lines."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.4))
  for arm, pts in points.items():
    pts = sorted(pts)
    x = np.asarray([f for f, _ in pts])
    mean = np.asarray([np.mean(v) for _, v in pts])
    std = np.asarray([np.std(v, ddof=1) if len(v) > 1 else 0.0 for _, v in pts])
    line, = ax.plot(x, mean, 'o-', label=arm)
    ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=line.get_color())
    if arm in fits:
      a, b = fits[arm]
      grid = np.geomspace(x.min(), x.max(), 20)
      ax.plot(grid, a + b * np.log10(grid), '--', color=line.get_color(), alpha=0.7)
  ax.set_xscale('log')
  ax.set_xlabel('training FLOPs (moejax/costs/flops.py)')
  ax.set_ylabel(metric_label)
  ax.set_title('Loss against compute: mean ± std over seeds, dashed: fit on log10 FLOPs',
               fontsize='medium')
  ax.legend(fontsize='small')
  return _save(plt, fig, workdir, 'ladder_loss.png')


def ladder_gap(workdir, gaps: dict, baseline: str):
  """The gap to the baseline at each rung with its interval, and the fitted trend:
  gaps {arm: ([flops], [diff], [low], [high], (intercept, slope))}."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.2))
  ax.axhline(0, color='black', lw=0.8)
  for i, (arm, (x, d, low, high, fit)) in enumerate(gaps.items()):
    x, d = np.asarray(x, float), np.asarray(d, float)
    shift = 1 + 0.03 * (i - (len(gaps) - 1) / 2)  # keep the error bars apart
    err = np.abs(np.asarray([np.asarray(d) - np.asarray(low), np.asarray(high) - d]))
    line = ax.errorbar(x * shift, d, yerr=err, fmt='o', capsize=3, label=arm)
    grid = np.geomspace(x.min(), x.max(), 20)
    ax.plot(grid, fit[0] + fit[1] * np.log10(grid), '--', color=line[0].get_color(), alpha=0.7)
  ax.set_xscale('log')
  ax.set_xlabel('training FLOPs')
  ax.set_ylabel(f'loss - loss of {baseline} (nats)')
  ax.set_title('Gap to the baseline per rung: mean and 95% t-interval; dashed: trend',
               fontsize='medium')
  ax.legend(fontsize='small')
  return _save(plt, fig, workdir, 'ladder_gap.png')


def ladder_multipliers(workdir, mults: dict, baseline: str):
  """Each arm's compute multiplier against the baseline per rung with its 95% interval (log
  axes; an infinite end drawn to the top edge): mults {arm: [multipliers.Multiplier]}."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.2))
  ax.axhline(1, color='black', lw=0.8)
  finite = [v for ms in mults.values() for m in ms for v in (m.low, m.value, m.high)
            if np.isfinite(v) and v > 0]
  if not finite:
    plt.close(fig)
    return None
  top = max(finite) * 1.5
  for i, (arm, ms) in enumerate(mults.items()):
    shift = 1 + 0.03 * (i - (len(mults) - 1) / 2)
    x = np.asarray([m.flops for m in ms]) * shift
    v = np.asarray([min(m.value, top) for m in ms])
    err = np.asarray([[max(m.value - m.low, 0) if np.isfinite(m.value) else 0 for m in ms],
                      [min(m.high, top) - min(m.value, top) for m in ms]])
    ax.errorbar(x, v, yerr=err, fmt='o', capsize=3, label=arm)
  ax.set_xscale('log')
  ax.set_yscale('log')
  ax.set_xlabel('training FLOPs of the rung')
  ax.set_ylabel(f'compute to reach {baseline}\'s loss (x)')
  ax.set_title(f'Compute multiplier against {baseline}: below 1 the arm needs less; 95% '
               'bootstrap interval over seeds', fontsize='medium')
  ax.legend(fontsize='small')
  return _save(plt, fig, workdir, 'ladder_multipliers.png')
