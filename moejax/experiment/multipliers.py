"""Compute multipliers from a ladder: how much training compute an arm needs to reach the
baseline's loss at each rung ("expert threshold reaches token choice's r3 loss with 0.8x its
compute"), with a 95% interval by bootstrap over seeds.

The fit is local and log-linear: each arm's val loss against log10 training FLOPs is a line
(least squares over every seed of every rung, an intercept and a slope per arm). The baseline's
line gives its loss at a rung's compute C; the arm's line gives the compute C' at which the arm
reaches that loss; the multiplier is C' / C (below 1: the arm needs less compute). Why not the
power law with an irreducible term, L = E + A C^-alpha fitted jointly across arms: the shipped
ladders span one decade of compute in 3-4 rungs, where the curve's bend is within the seed
noise, so E and alpha are not identified apart (they trade off along a ridge and the fit's
multipliers swing with them); the log-linear fit is the power law's first-order expansion over
the range the ladder measured, and its multipliers are read inside that range. A multiplier
whose C' falls outside the ladder's compute is an extrapolation, and the report says so.

The interval comes from a bootstrap over seeds: resample the seeds within each rung (the same
seeds for the arm and the baseline where the two pair, each arm's own where they cannot), refit
both lines, recompute the multiplier (2,000 resamples). With 3-5 seeds a rung the percentile
interval of those resamples covers the true multiplier far less often than 95% (63% with 3
seeds, 78% with 5, over the hand-made ladders of tests/test_multipliers.py: the bootstrap's
spread of n seeds is a normal's with the variance shrunk by (n - 1) / n, without t's tails),
so the interval is a t-interval on log10 of the multiplier: its bootstrap standard error,
scaled by sqrt(n / (n - 1)), times Student's t with n - 1 degrees of freedom, n the fewest seeds
at a rung (96% coverage on the same ladders). Where more than 2.5% of the resamples
have an arm whose loss does not fall with compute (it never reaches the baseline's loss), the
upper end is infinite.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats

LEVEL = 0.95
REPS = 2000


@dataclasses.dataclass
class Multiplier:
  """One arm against the baseline at one rung."""
  flops: float  # the rung's training FLOPs (C)
  value: float  # C' / C: the arm's compute to reach the baseline's loss at C, over C
  low: float  # the bootstrap interval at LEVEL (inf: some resamples never reach it)
  high: float
  extrapolated: bool  # C' outside the ladder's compute
  draws: np.ndarray | None = dataclasses.field(default=None, repr=False)  # [reps] resampled


def line(logc, loss) -> tuple[float, float]:
  """(intercept, slope) of the least-squares line of loss on log10 compute.

  Args:
    logc, loss: [points] log10 training FLOPs and val loss, one point per run.
  """
  x, y = np.asarray(logc, float), np.asarray(loss, float)
  xc = x - x.mean()
  slope = float((xc * (y - y.mean())).sum() / (xc * xc).sum())
  return float(y.mean() - slope * x.mean()), slope


def multiplier(base: tuple, arm: tuple, logc: float) -> float:
  """C' / C at log10 C = logc from the two lines (intercept, slope): inf where the arm's loss
  does not fall with compute (it never reaches the baseline's)."""
  target = base[0] + base[1] * logc
  if not arm[1] < 0:
    return math.inf
  return float(10.0 ** ((target - arm[0]) / arm[1] - logc))


def _lines(rungs: list, pick) -> tuple:
  """(baseline line, arm line) from per-rung (logc, base values, arm values) with picked
  indices."""
  xb, yb, xa, ya = [], [], [], []
  for (logc, b, a), (ib, ia) in zip(rungs, pick):
    xb += [logc] * len(ib)
    yb += list(b[ib])
    xa += [logc] * len(ia)
    ya += list(a[ia])
  return line(xb, yb), line(xa, ya)


def compute_multipliers(rungs: list, paired: bool, reps: int = REPS,
                        seed: int = 0) -> list[Multiplier]:
  """The arm's multiplier against the baseline at each rung.

  Args:
    rungs: [(training FLOPs, baseline values [seeds], arm values [seeds])] per rung, at least
      two rungs; paired: the values are aligned by seed (the same length at each rung) and
      resampled together.
  Returns:
    [Multiplier] per rung, in the order given.
  """
  data = [(math.log10(f), np.asarray(b, float), np.asarray(a, float)) for f, b, a in rungs]
  if len({x for x, _, _ in data}) < 2:
    raise ValueError('a multiplier needs rungs at two or more compute budgets')
  everything = [(np.arange(len(b)), np.arange(len(a))) for _, b, a in data]
  base_line, arm_line = _lines(data, everything)
  rng = np.random.default_rng(seed)
  draws = np.empty((reps, len(data)))
  for r in range(reps):
    pick = []
    for _, b, a in data:
      ib = rng.integers(0, len(b), len(b))
      pick.append((ib, ib if paired else rng.integers(0, len(a), len(a))))
    bl, al = _lines(data, pick)
    draws[r] = [multiplier(bl, al, x) for x, _, _ in data]
  lo_x, hi_x = min(x for x, _, _ in data), max(x for x, _, _ in data)
  n = min(min(len(b), len(a)) for _, b, a in data)
  t = stats.t.ppf((1 + LEVEL) / 2, n - 1) if n > 1 else math.inf
  out = []
  for j, (x, _, _) in enumerate(data):
    value = multiplier(base_line, arm_line, x)
    finite = draws[:, j][np.isfinite(draws[:, j])]
    if not math.isfinite(value) or finite.size < 2:
      low, high = (value, value) if not math.isfinite(value) else (0.0, math.inf)
    else:
      half = t * float(np.log10(finite).std(ddof=1)) * math.sqrt(n / (n - 1))
      low = 10.0 ** (math.log10(value) - half)
      high = 10.0 ** (math.log10(value) + half)
      if finite.size < (1 - (1 - LEVEL) / 2) * reps:
        high = math.inf
    reach = x + math.log10(value) if math.isfinite(value) else math.inf
    out.append(Multiplier(10.0 ** x, value, low, high,
                          not lo_x - 1e-9 <= reach <= hi_x + 1e-9, draws[:, j]))
  return out


def describe(value: float) -> str:
  """0.8 -> '0.80x'; inf -> 'never'."""
  return f'{value:.2f}x' if math.isfinite(value) else 'never'
