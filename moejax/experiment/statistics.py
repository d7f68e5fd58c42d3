"""The statistics of a comparison between arms over seeds, from scipy.stats and statsmodels.

Arms that share their seeds share the data order and, where the parameter shapes agree, the
initial parameters: their seed-wise differences are paired. `compare(arm, baseline, delta,
paired=True)` tests the mean of the per-seed differences (paired t-test, a bootstrap interval
that resamples the pairs, two one-sided tests on the differences). Arms that cannot pair (their
parameters differ in shape, or their seeds differ) are compared as independent samples: Welch's
t-test, a bootstrap that resamples each arm, TOST with unequal variances.

`verdicts` decides, for a metric where lower is better (a loss), each arm against the baseline:
  'better' / 'worse'  the t-test rejects a zero difference after Holm's correction over the arms;
  'equivalent'        the two one-sided tests reject |difference| >= delta, after Holm;
  'inconclusive'      neither: at this size the experiment cannot tell.
With the minimum detectable effect at 80% power (from the observed spread) and the seeds per arm
that would detect a difference of delta.
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
from scipy import stats
from statsmodels.stats import multitest, power as smpower, weightstats

LEVEL = 0.95  # of the intervals
ALPHA = 0.05  # of the tests
POWER = 0.8  # of the minimum detectable effect and the seeds needed


@dataclasses.dataclass
class Comparison:
  """arm - baseline over seeds, for one metric."""
  paired: bool
  n: int  # pairs (paired), or the seeds of the smaller arm
  diff: float  # mean of the per-seed differences, or the difference of the means
  low: float  # bootstrap interval of diff at LEVEL
  high: float
  p: float  # two-sided t-test of diff = 0 (paired t-test or Welch's)
  p_tost: float  # two one-sided tests of |diff| >= delta (small: equivalent)
  sd: float  # spread: of the differences (paired) or pooled over the two arms
  mde: float  # the smallest |diff| this design detects with POWER at ALPHA (two-sided)
  seeds_needed: float  # seeds per arm that would detect |diff| = delta with POWER
  delta: float
  p_holm: float = math.nan  # p after Holm over the arms compared with the baseline
  p_tost_holm: float = math.nan
  verdict: str = ''


def bootstrap_interval(a, b, paired: bool, level: float = LEVEL, reps: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap interval of mean(a - b) resampling the pairs (paired), or of
  mean(a) - mean(b) resampling each arm (unpaired)."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  rng = np.random.default_rng(seed)
  if paired:
    res = stats.bootstrap((a - b,), np.mean, confidence_level=level, n_resamples=reps,
                          method='percentile', random_state=rng)
  else:
    res = stats.bootstrap((a, b), lambda x, y, axis=-1: x.mean(axis) - y.mean(axis),
                          confidence_level=level, n_resamples=reps, method='percentile',
                          random_state=rng)
  return float(res.confidence_interval.low), float(res.confidence_interval.high)


def compare(a, b, delta: float, paired: bool) -> Comparison:
  """a (the arm) against b (the baseline), one value per seed each (paired: in seed order).

  Args:
    a, b: [seeds] the metric of each run.
    delta: the equivalence margin, in the metric's units.
    paired: compare per-seed differences (same seeds, same initial parameters and data order)
      rather than two independent samples.
  Returns:
    the Comparison (verdicts() adds the Holm-corrected p-values and the verdict).
  """
  a, b = np.asarray(a, float), np.asarray(b, float)
  if paired:
    if a.shape != b.shape:
      raise ValueError(f'a paired comparison needs the same seeds ({a.size} and {b.size})')
    d = a - b
    n, diff = d.size, float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else math.nan
    testable = n > 1 and sd > 0
    p = stats.ttest_rel(a, b).pvalue if testable else math.nan
    p_tost = weightstats.ttost_paired(a, b, -delta, delta)[0] if testable else math.nan
  else:
    n, diff = min(a.size, b.size), float(a.mean() - b.mean())
    sd = float(math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)) if n > 1 else math.nan
    testable = n > 1 and sd > 0
    p = stats.ttest_ind(a, b, equal_var=False).pvalue if testable else math.nan
    p_tost = (weightstats.ttost_ind(a, b, -delta, delta, usevar='unequal')[0] if testable
              else math.nan)
  p = _degenerate(p, sd, diff != 0)
  p_tost = _degenerate(p_tost, sd, abs(diff) < delta)
  mde = effect_for_power(n, paired) * sd
  seeds = seeds_for_power(delta / sd, paired) if sd > 0 else 2.0
  if sd == 0:  # every seed agrees: the interval is the point
    low = high = diff
  else:
    low, high = bootstrap_interval(a, b, paired) if n > 1 else (math.nan, math.nan)
  return Comparison(paired, int(n), diff, low, high, float(p), float(p_tost), sd, float(mde),
                    float(seeds), delta)


def _degenerate(p, sd: float, holds: bool) -> float:
  """A p-value where the t-statistic is undefined because every seed gives the same
  difference (sd 0): then the claim is certain when it holds (0) and rejected when not (1)."""
  if sd == 0:
    return 0.0 if holds else 1.0
  return float(p)


def effect_for_power(n: int, paired: bool) -> float:
  """The standardized effect (difference / sd) a two-sided t-test at ALPHA detects with
  POWER from n seeds (pairs, or per arm)."""
  if n < 2:
    return math.inf
  if paired:
    return float(smpower.TTestPower().solve_power(effect_size=None, nobs=n, alpha=ALPHA,
                                                  power=POWER))
  return float(smpower.TTestIndPower().solve_power(effect_size=None, nobs1=n, alpha=ALPHA,
                                                   power=POWER))


def seeds_for_power(effect: float, paired: bool) -> float:
  """The seeds (pairs, or per arm) a two-sided t-test at ALPHA needs to detect a standardized
  effect with POWER, rounded up."""
  with warnings.catch_warnings():  # a failed bracket is handled below
    warnings.simplefilter('ignore')
    if paired:
      n = smpower.TTestPower().solve_power(effect_size=effect, nobs=None, alpha=ALPHA,
                                           power=POWER)
    else:
      n = smpower.TTestIndPower().solve_power(effect_size=effect, nobs1=None, alpha=ALPHA,
                                              power=POWER)
  n = float(np.asarray(n).ravel()[0])
  if not math.isfinite(n):  # the solver's bracket failed: an effect too large or too small
    return 2.0 if effect >= 1 else math.inf
  return float(max(2, math.ceil(n - 1e-9)))


def verdicts(comparisons: dict[str, Comparison], lower_is_better: bool = True) -> dict:
  """Holm's correction over the arms (each family: the difference tests, the equivalence
  tests), then each arm's verdict; the comparisons are updated in place and returned."""
  names = list(comparisons)
  if not names:
    return comparisons
  for attr, out in (('p', 'p_holm'), ('p_tost', 'p_tost_holm')):
    adjusted = multitest.multipletests([getattr(comparisons[n], attr) for n in names],
                                       alpha=ALPHA, method='holm')[1]
    for n, q in zip(names, adjusted):
      setattr(comparisons[n], out, float(q))
  for c in comparisons.values():
    differs, same = c.p_holm < ALPHA, c.p_tost_holm < ALPHA
    if differs:
      good = (c.diff < 0) == lower_is_better
      c.verdict = ('better' if good else 'worse') + (', within delta' if same else '')
    else:
      c.verdict = 'equivalent' if same else 'inconclusive'
  return comparisons
