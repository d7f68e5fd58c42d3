"""Column functions shared by the experiments: fn(metric rows of one run, its config) -> value.
(Not an experiment.)"""
import math

import numpy as np


def tail_mean(key: str, n: int = 5):
  """Mean of the last n logged values of a metric (per layer if it is a list)."""
  def fn(rows, config):
    vals = [r[key] for r in rows if key in r][-n:]
    if not vals:
      return None
    mean = np.mean(np.asarray(vals, dtype=float), axis=0)
    return mean.tolist() if mean.ndim else float(mean)
  return fn


def steps_to_balance(threshold: float, key: str = 'moe/per_layer/max_vio'):
  """Per MoE layer: the first logged step from which MaxVio (batch) stays below threshold
  for the rest of the run (inf if it never settles: the report says 'never')."""
  def fn(rows, config):
    logged = [(r['step'], r[key]) for r in rows if key in r]
    if not logged:
      return None
    steps = [s for s, _ in logged]
    vio = np.asarray([v for _, v in logged], dtype=float)  # [logs, layers]
    out = []
    for layer in range(vio.shape[1]):
      above = np.nonzero(vio[:, layer] >= threshold)[0]
      settled = 0 if not len(above) else above[-1] + 1
      out.append(float(steps[settled]) if settled < len(steps) else math.inf)
    return out
  return fn
