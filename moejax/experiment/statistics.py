"""The statistics of a comparison between arms over seeds, from scipy.stats and statsmodels.

Arms that share their seeds share the data order and, where the parameter shapes agree, the
initial parameters: their seed-wise differences are paired. `compare(arm, baseline, delta,
paired=True)` tests the mean of the per-seed differences (paired t-test, two one-sided tests
on the differences). Arms that cannot pair (their parameters differ in shape, or their seeds
differ) are compared as independent samples: Welch's t-test, TOST with unequal variances.

`verdicts` decides, for a metric where lower is better (a loss), each arm against the baseline:
  'better' / 'worse'  the t-test rejects a zero difference after Holm's correction over the arms;
  'equivalent'        the two one-sided tests reject |difference| >= delta, after Holm;
  'inconclusive'      neither: at this size the experiment cannot tell.
With the minimum detectable effect at 80% power (from the observed spread) and the seeds per arm
that would detect a difference of delta.

One interval per verdict: the interval beside a verdict is the t-interval its test implies, at
the level Holm's step-down spent on that arm (`holm`), so a difference verdict is exactly
"the interval excludes 0" and an equivalence verdict "the (1 - 2 alpha) interval lies inside
+-delta" (the two one-sided tests as an interval). With `looks` > 1 (seeds added in rounds until
decided, sequential.py) every test runs at ALPHA / looks: a Bonferroni boundary over the looks,
valid however the looks depend on each other.
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
from scipy import stats
from statsmodels.stats import power as smpower, weightstats

LEVEL = 0.95  # of the intervals
ALPHA = 0.05  # of the tests
POWER = 0.8  # of the minimum detectable effect and the seeds needed


@dataclasses.dataclass
class Comparison:
  """arm - baseline over seeds, for one metric."""
  paired: bool
  n: int  # pairs (paired), or the seeds of the smaller arm
  diff: float  # mean of the per-seed differences, or the difference of the means
  low: float  # the verdict's interval of diff (t-interval; `level` its confidence)
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
  level: float = LEVEL  # of [low, high]
  alpha: float = ALPHA  # the level the difference test ran at (Holm's step, the looks)
  alpha_tost: float = ALPHA  # and each one-sided test of equivalence
  looks: int = 1  # the looks the tests are corrected for (seeds added until decided)
  a: np.ndarray | None = dataclasses.field(default=None, repr=False)  # the samples (paired:
  b: np.ndarray | None = dataclasses.field(default=None, repr=False)  # aligned by seed)

  def interval(self, level: float, one_sided: bool = False) -> tuple[float, float]:
    """The t-interval of diff at `level` (paired: of the mean difference; unpaired: Welch's,
    with Welch-Satterthwaite degrees of freedom); one_sided: the interval the two one-sided
    tests at 1 - level each imply (level 1 - 2 (1 - level))."""
    if not self.sd > 0:  # every seed agrees (or one seed): the interval is the point
      return (self.diff, self.diff) if self.sd == 0 else (math.nan, math.nan)
    alpha = (1 - level) * (2 if one_sided else 1)
    if self.paired:
      low, high = weightstats.DescrStatsW(self.a - self.b).tconfint_mean(alpha)
    else:
      low, high = weightstats.CompareMeans.from_data(self.a, self.b).tconfint_diff(
          alpha, usevar='unequal')
    return float(low), float(high)


def compare(a, b, delta: float, paired: bool, power: bool = True) -> Comparison:
  """a (the arm) against b (the baseline), one value per seed each (paired: in seed order).

  Args:
    a, b: [seeds] the metric of each run.
    delta: the equivalence margin, in the metric's units.
    paired: compare per-seed differences (same seeds, same initial parameters and data order)
      rather than two independent samples.
    power: also the minimum detectable effect and the seeds for delta (nan without).
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
  mde = effect_for_power(n, paired) * sd if power else math.nan
  seeds = (seeds_for_power(delta / sd, paired) if sd > 0 else 2.0) if power else math.nan
  c = Comparison(paired, int(n), diff, math.nan, math.nan, float(p), float(p_tost), sd,
                 float(mde), float(seeds), delta, a=a, b=b)
  c.low, c.high = c.interval(LEVEL)
  return c


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


def seeds_for_power(effect: float, paired: bool, alpha: float = ALPHA) -> float:
  """The seeds (pairs, or per arm) a two-sided t-test at alpha needs to detect a standardized
  effect with POWER, rounded up."""
  with warnings.catch_warnings():  # a failed bracket is handled below
    warnings.simplefilter('ignore')
    if paired:
      n = smpower.TTestPower().solve_power(effect_size=effect, nobs=None, alpha=alpha,
                                           power=POWER)
    else:
      n = smpower.TTestIndPower().solve_power(effect_size=effect, nobs1=None, alpha=alpha,
                                              power=POWER)
  n = float(np.asarray(n).ravel()[0])
  if not math.isfinite(n):  # the solver's bracket failed: an effect too large or too small
    return 2.0 if effect >= 1 else math.inf
  return float(max(2, math.ceil(n - 1e-9)))


def holm(ps, alpha: float = ALPHA) -> tuple[list[float], list[float]]:
  """Holm's step-down over m p-values: the adjusted p-values (as statsmodels' multipletests
  gives them) and the level the step-down spends on each hypothesis. Sorted p(1) <= ... <=
  p(m), the j-th is tested at alpha / (m - j + 1) while every earlier one was rejected; from the
  first kept one on, all are held to that one's level. So p_i <= level_i exactly when Holm
  rejects i, and the (1 - level_i) interval of each test excludes its null exactly then.
  (Written out rather than multipletests, which runs a full garbage collection per call: the
  simulations of tests/test_sequential.py call it tens of thousands of times.)

  Args:
    ps: [m] p-values (nan: untestable, taken as 1).
  Returns:
    ([m] adjusted p-values, [m] levels), in the order of ps.
  """
  ps = [1.0 if math.isnan(p) else float(p) for p in ps]
  m = len(ps)
  order = sorted(range(m), key=lambda i: ps[i])
  adjusted, levels, stop, running = [0.0] * m, [0.0] * m, None, 0.0
  for j, i in enumerate(order):
    here = alpha / (m - j)
    running = max(running, min(1.0, (m - j) * ps[i]))
    adjusted[i] = running
    if stop is None and ps[i] > here:
      stop = here
    levels[i] = here if stop is None else stop
  return adjusted, levels


def verdicts(comparisons: dict[str, Comparison], lower_is_better: bool = True,
             looks: int = 1) -> dict:
  """Holm's correction over the arms (each family: the difference tests, the equivalence
  tests), at ALPHA / looks, then each arm's verdict and the interval its test implies; the
  comparisons are updated in place and returned.

  Args:
    comparisons: {arm: Comparison} against one baseline.
    looks: the looks at the data the experiment plans at most (sequential.py); each test's p
      counts looks times (a Bonferroni boundary over the looks).
  """
  names = list(comparisons)
  if not names:
    return comparisons
  for attr, out in (('p', 'p_holm'), ('p_tost', 'p_tost_holm')):
    ps = [min(1.0, looks * getattr(comparisons[n], attr)) for n in names]
    for n, q, level in zip(names, *holm(ps)):
      setattr(comparisons[n], out, float(q))
      setattr(comparisons[n], 'alpha' if attr == 'p' else 'alpha_tost', level / looks)
  for c in comparisons.values():
    c.looks = looks
    differs, same = c.p_holm <= ALPHA, c.p_tost_holm <= ALPHA
    if differs:
      good = (c.diff < 0) == lower_is_better
      c.verdict = ('better' if good else 'worse') + (', within delta' if same else '')
    else:
      c.verdict = 'equivalent' if same else 'inconclusive'
    if c.verdict == 'equivalent':  # the interval of the two one-sided tests
      c.level = 1 - 2 * c.alpha_tost
      c.low, c.high = c.interval(1 - c.alpha_tost, one_sided=True)
    else:
      c.level = 1 - c.alpha
      c.low, c.high = c.interval(c.level)
  return comparisons
