"""Weights & Biases as a metric sink beside metrics.jsonl and TensorBoard (`train.wandb_project`;
the `wandb` extra), on JAX process 0 only.

The W&B run's id is kept in WORKDIR/wandb_id, so a resumed run (after a preemption or a crash)
logs into the same W&B run; W&B keeps the rows it already has (a resume from the last checkpoint
logs the steps after it again, the same numbers: training resumes bit-identically) and the
writer sends only steps after the last one W&B holds. `train.wandb_mode='offline'` writes the
run under WORKDIR/wandb without a network (`wandb sync WORKDIR/wandb/offline-run-*` uploads it
later); W&B's own WANDB_* environment variables apply as usual.
"""
from __future__ import annotations

import os
import secrets
import sys

from moejax.errors import ConfigError

INSTALL = "train.wandb_project is set but wandb is not installed: pip install 'moejax[wandb]'"
MODES = ('', 'online', 'offline')  # '': WANDB_MODE, else online


def check(c):
  """train.wandb_*: the mode known, wandb installed when a project is named (before any
  compile)."""
  t = c.train
  if t.wandb_mode not in MODES:
    raise ConfigError(f'config.train.wandb_mode={t.wandb_mode!r}: must be one of '
                      f"{list(MODES)} ('offline' writes under WORKDIR/wandb, no network)")
  if not t.wandb_project:
    for field in ('wandb_entity', 'wandb_name', 'wandb_group'):
      if t[field]:
        raise ConfigError(f'config.train.{field}={t[field]!r}: set train.wandb_project too '
                          '(the W&B project to log to)')
    return
  try:
    import wandb  # noqa: F401
  except ImportError:
    raise ConfigError(INSTALL) from None


class WandbWriter:
  """Logs the rows of MetricWriter to a W&B run: scalars as they are, per-layer lists as one
  scalar per MoE layer, expert loads as histograms (as TensorBoard gets them).

  Args:
    workdir: the run's directory (the W&B run id and offline files live there).
    config: the run's config (its train.wandb_* fields; all of it becomes the W&B config).
  """

  def __init__(self, workdir: str, config):
    import wandb
    t = config.train
    id_path = os.path.join(workdir, 'wandb_id')
    if os.path.exists(id_path):
      with open(id_path) as f:
        run_id = f.read().strip()
    else:
      run_id = secrets.token_hex(4)  # W&B ids: letters and digits
      with open(id_path, 'w') as f:
        f.write(run_id + '\n')
    self.wandb = wandb
    self.run = wandb.init(
        project=t.wandb_project, entity=t.wandb_entity or None,
        name=t.wandb_name or os.path.basename(os.path.abspath(workdir)),
        group=t.wandb_group or None, id=run_id, resume='allow', dir=workdir,
        mode=t.wandb_mode or None, config=config.to_dict(),
        settings=wandb.Settings(console='off', silent=True))
    self.after = (self.run.step or 0) - 1  # the last step W&B holds (-1: none)
    offline = self.run.settings._offline
    where = (f'{os.path.dirname(self.run.dir)} (offline: upload it with wandb sync)' if offline
             else self.run.url)
    print(f'W&B run {run_id}: {where}', file=sys.stderr)

  def write(self, step: int, row: dict):
    """One logged row (plain Python values, as MetricWriter has them)."""
    if step <= self.after:
      return  # W&B has this step from before the resume
    out = {}
    for k, v in row.items():
      if isinstance(v, (int, float)):
        out[k] = v
      elif '/per_layer/' in k:
        out.update({f'{k}/moe_layer_{layer}': x for layer, x in enumerate(v)})
      elif k.endswith(('expert_load', 'active_experts_hist')):
        for layer, loads in enumerate(v):
          edges = list(range(len(loads) + 1))
          out[f'{k}/moe_layer_{layer}'] = self.wandb.Histogram(np_histogram=(loads, edges))
    self.run.log(out, step=int(step))

  def close(self):
    self.run.finish()
