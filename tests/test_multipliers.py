"""Compute multipliers (moejax/experiment/multipliers.py) on hand-made ladders whose multiplier is
known: exact lines (the multiplier and a degenerate interval), lines of other slopes worked by
hand, noisy seeds (the known multiplier inside the interval, paired and not, and the interval's
coverage over repeated ladders), an arm that never reaches the loss, and the report's table."""
import math

import numpy as np
import pytest
from scipy import stats

from moejax.experiment import multipliers as mu

X = [9.0, 9.3, 9.6, 9.9]  # log10 training FLOPs of four rungs: 8x compute


def _ladder(base_line, arm_line, seeds=5, noise=0.0, shared=0.0, seed=0):
  """[(FLOPs, baseline values, arm values)]: each a line in log10 FLOPs, plus a per-seed effect
  both arms share (paired) and noise of their own."""
  rng = np.random.default_rng(seed)
  out = []
  for x in X:
    common = rng.normal(0, shared, seeds)
    b = base_line[0] + base_line[1] * x + common + rng.normal(0, noise, seeds)
    a = arm_line[0] + arm_line[1] * x + common + rng.normal(0, noise, seeds)
    out.append((10.0 ** x, b, a))
  return out


def test_the_line_is_least_squares():
  rng = np.random.default_rng(0)
  x, y = rng.uniform(9, 10, 20), rng.normal(2, 0.1, 20)
  fit = stats.linregress(x, y)
  assert mu.line(x, y) == pytest.approx((fit.intercept, fit.slope), rel=1e-10)


def test_exact_lines_give_the_multiplier_at_every_rung():
  """The arm at compute C has the baseline's loss at C / 0.8: it reaches the baseline's loss at
  C with 0.8 C. No noise: every resample gives 0.8."""
  base = (3.0, -0.1)
  arm = (3.0 + 0.1 * math.log10(0.8), -0.1)  # loss(C) = base(C / 0.8)
  for m in mu.compute_multipliers(_ladder(base, arm), paired=True, reps=200):
    assert (m.value, m.low, m.high) == pytest.approx((0.8, 0.8, 0.8), rel=1e-9)
  assert [m.flops for m in mu.compute_multipliers(_ladder(base, arm), True, reps=10)] == (
      pytest.approx([10.0 ** x for x in X]))


def test_other_slopes_by_hand():
  """Baseline 3 - 0.1 x, arm 3.05 - 0.105 x (x = log10 C): at x = 9 the baseline's loss is 2.1,
  which the arm reaches at x' = (3.05 - 2.1) / 0.105 = 9.0476: 10^0.0476 = 1.116x; at 9.9 the
  loss 2.01 at x' = 1.04 / 0.105 = 9.905: 1.0110x. An arm whose loss rises never gets there."""
  ms = mu.compute_multipliers(_ladder((3.0, -0.1), (3.05, -0.105)), True, reps=20)
  assert ms[0].value == pytest.approx(10 ** ((3.05 - 2.1) / 0.105 - 9), rel=1e-9)
  assert ms[0].value == pytest.approx(1.1159, abs=1e-4)
  assert ms[-1].value == pytest.approx(10 ** (1.04 / 0.105 - 9.9), rel=1e-9)
  assert [m.extrapolated for m in ms] == [False, False, False, True]  # 9.905 > 9.9
  far = mu.compute_multipliers(_ladder((3.0, -0.1), (3.2, -0.1)), True, reps=20)
  assert far[0].value == pytest.approx(100.0) and far[0].extrapolated  # needs 10^11 FLOPs
  never = mu.compute_multipliers(_ladder((3.0, -0.1), (2.0, 0.01)), True, reps=20)
  assert all(m.value == math.inf and m.high == math.inf for m in never)
  assert mu.describe(math.inf) == 'never' and mu.describe(0.8) == '0.80x'
  with pytest.raises(ValueError, match='two or more compute budgets'):
    mu.compute_multipliers([(1e9, [1.0, 2.0], [1.0, 2.0])] * 2, True)


@pytest.mark.parametrize('paired', [True, False])
def test_a_known_multiplier_and_pairing(paired):
  """The shipped ladders' scale (loss falls about 0.6 nats per decade of compute; seeds spread
  0.02): seeds with a shared effect (sd 0.02) and their own noise (sd 0.004), the arm needs 0.6x
  the compute. The estimate is near 0.6 (whether one ladder's interval holds it is a matter of
  chance: the coverage over many is the next test); paired resampling keeps the shared effect
  out: the paired interval is narrower than the unpaired one on the same data."""
  base = (7.5, -0.6)
  arm = (7.5 + 0.6 * math.log10(0.6), -0.6)
  data = _ladder(base, arm, noise=0.004, shared=0.02)
  ms = mu.compute_multipliers(data, paired)
  for m in ms:
    assert m.low < m.value < m.high and m.value == pytest.approx(0.6, rel=0.1)
  # The interval by hand from the resamples: log10 value +- t(0.975, 4) x their sd x sqrt(5/4).
  for m in ms:
    half = stats.t.ppf(0.975, 4) * np.log10(m.draws).std(ddof=1) * math.sqrt(5 / 4)
    assert (m.low, m.high) == pytest.approx((m.value / 10 ** half, m.value * 10 ** half))
  other = mu.compute_multipliers(data, not paired)
  widths = [m.high / m.low for m in ms], [m.high / m.low for m in other]
  narrow, wide = widths if paired else widths[::-1]
  assert all(n < w for n, w in zip(narrow, wide))


@pytest.mark.parametrize('seeds', [3, 5])
def test_the_interval_covers_and_the_percentile_one_would_not(seeds):
  """30 ladders with fresh noise (paired, 3 or 5 seeds a rung), 4 rungs each: the 95% interval
  holds the true 0.6x at 90% of the rungs or more, while the percentile interval of the same
  resamples covers less than 90% (why the interval is a t-interval on the bootstrap's standard
  error, multipliers.py)."""
  base, arm = (7.5, -0.6), (7.5 + 0.6 * math.log10(0.6), -0.6)
  covered = percentile = total = 0
  for seed in range(30):
    for m in mu.compute_multipliers(_ladder(base, arm, seeds=seeds, noise=0.004, shared=0.02,
                                            seed=seed), True, reps=300):
      covered += m.low < 0.6 < m.high
      low, high = np.percentile(m.draws, [2.5, 97.5])
      percentile += low < 0.6 < high
      total += 1
  assert covered / total >= 0.9 > percentile / total
