"""Metric sinks: DIR/metrics.jsonl (one object per logged step), TensorBoard, and plots."""
from __future__ import annotations

import json
import os
import sys

import numpy as np


def _plain(v):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


class MetricWriter:
  """Appends to metrics.jsonl and TensorBoard event files, and logs to Weights & Biases when
  given a WandbWriter (only on JAX process 0).

  `resume_step` is the step of the checkpoint the run restarts from (-1 for a fresh start):
  rows logged after it are removed first (and a torn last line dropped), so every step appears
  exactly once, and TensorBoard is told to purge its events after that step.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = -1,
               config_text: str = '', wandb=None):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tb = None
    self.wandb = wandb
    if not enabled:
      return
    self.truncate(resume_step)
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'),
                            purge_step=resume_step + 1 if resume_step >= 0 else None)
    if config_text:
      # Markdown code block: TensorBoard's text tab shows the resolved config as written.
      self.tb.add_text('config', '    ' + config_text.replace('\n', '\n    '),
                       max(resume_step, 0))

  def truncate(self, step: int):
    if self.enabled:
      truncate_after(self.path, step)

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    row = {'step': int(step), **{k: _plain(v) for k, v in metrics.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    if self.wandb is not None:
      self.wandb.write(int(step), {k: v for k, v in row.items() if k != 'step'})
    for k, v in row.items():
      if k == 'step':
        continue
      if isinstance(v, bool):
        self.tb.add_scalar(k, float(v), step)
      elif isinstance(v, (int, float)):
        if np.isfinite(v):  # a diverged step's NaN stays in metrics.jsonl only
          self.tb.add_scalar(k, v, step)
      elif '/per_layer/' in k:
        for layer, x in enumerate(v):
          self.tb.add_scalar(f'{k}/moe_layer_{layer}', x, step)
      elif k.endswith(('expert_load', 'active_experts_hist')):
        for layer, loads in enumerate(v):
          self.tb.add_histogram(f'{k}/moe_layer_{layer}', np.repeat(
              np.arange(len(loads)), np.round(np.asarray(loads) * 1000).astype(int)), step)

  def close(self):
    if self.tb is not None:
      self.tb.close()
    if self.wandb is not None:
      self.wandb.close()
      self.wandb = None


def write_json(path: str, value, indent=None, default=None):
  """A JSON file written whole or not at all (a temporary file renamed over it), so a reader
  never sees half of one."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=indent, default=default)
  os.replace(tmp, path)


def truncate_after(path: str, step: int):
  """Keep only whole rows logged at or before `step` (a run resumed from there logs the rest
  again); step -1 empties the file. Written to a temporary file, then renamed over it."""
  if not os.path.exists(path):
    return
  rows = read_metrics(path)
  kept = [r for r in rows if r.get('step', 0) <= step]
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in kept)
  os.replace(tmp, path)


def read_metrics(path: str) -> list[dict]:
  """The rows of metrics.jsonl. A line that does not parse (a write cut short by a kill or a
  full disk) is dropped with a warning."""
  rows = []
  with open(path) as f:
    lines = f.readlines()
  for i, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      where = 'its last line' if i == len(lines) else f'line {i}'
      print(f'warning: {path}: dropped {where}, which is not a whole JSON row (a write cut '
            'short)', file=sys.stderr)
  return rows


def plot_expert_load(metrics_path: str, out_path: str, moe_layer_ids=None) -> str | None:
  """Per MoE layer, a heatmap of expert (y) by step (x), colour = share of routed tokens;
  below them, MaxVio of each layer over training."""
  rows = [r for r in read_metrics(metrics_path) if 'moe/expert_load' in r]
  if not rows:
    return None
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  steps = np.asarray([r['step'] for r in rows])
  load = np.asarray([r['moe/expert_load'] for r in rows])  # [steps, layers, N]
  layers, n = load.shape[1], load.shape[2]
  names = moe_layer_ids or list(range(layers))
  fig, axes = plt.subplots(layers + 1, 1, figsize=(10, 2.8 + 1.6 * layers), squeeze=False,
                           sharex=True)
  vmax = max(2.0 / n, float(load.max()))
  for i, ax in enumerate(axes[:-1, 0]):
    im = ax.imshow(load[:, i, :].T, aspect='auto', origin='lower', cmap='viridis', vmin=0,
                   vmax=vmax, extent=(steps[0], max(steps[-1], steps[0] + 1), -0.5, n - 0.5),
                   interpolation='nearest')
    ax.set_ylabel(f'layer {names[i]}\nexpert')
  fig.colorbar(im, ax=axes[:, 0].tolist(), shrink=0.6, label='share of routed tokens')
  vio = (load.max(-1) - load.mean(-1)) / load.mean(-1)  # [steps, layers]
  ax = axes[-1, 0]
  for i in range(layers):
    ax.plot(steps, vio[:, i], label=f'layer {names[i]}')
  ax.set_ylabel('MaxVio (batch)')
  ax.set_xlabel('step')
  ax.legend(fontsize='small', ncol=min(layers, 4))
  fig.suptitle(f'Expert load per MoE layer (uniform = {1 / n:.3f})')
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
  return out_path
