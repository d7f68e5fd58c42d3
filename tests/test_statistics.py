"""The comparison statistics (moejax/experiment/statistics.py, from scipy and statsmodels) against
hand-worked closed forms: Student's t with 1 and 2 degrees of freedom has closed-form tails, so
a paired test of two seeds, Welch's test of two samples of two and TOST of two pairs can be
computed by hand; Holm's correction by hand and against statsmodels; power against the
noncentral t; both tails; the intervals by hand, their levels, and their agreement with every
verdict over random small samples."""
import math

import numpy as np
import pytest
from scipy import stats

from moejax.experiment import statistics as st


def cauchy_two_sided(t):
  """P(|T| > |t|) for Student's t with 1 degree of freedom (the Cauchy distribution)."""
  return 1 - 2 / math.pi * math.atan(abs(t))


def t2_two_sided(t):
  """P(|T| > |t|) for Student's t with 2 degrees of freedom."""
  return 1 - abs(t) / math.sqrt(2 + t * t)


@pytest.mark.parametrize('sign', [1, -1])
def test_paired_t_test_of_two_seeds_by_hand(sign):
  # differences d = (0.3, 0.1) (or their negatives): mean 0.2, sd sqrt(0.02), t = 0.2 /
  # (sqrt(0.02) / sqrt(2)) = 2, df = 1.
  a = np.array([1.3, 2.1]) if sign > 0 else np.array([0.7, 1.9])
  b = np.array([1.0, 2.0])
  c = st.compare(a, b, delta=0.5, paired=True)
  assert c.paired and c.n == 2
  assert c.diff == pytest.approx(sign * 0.2)
  assert c.sd == pytest.approx(math.sqrt(0.02))
  assert c.p == pytest.approx(cauchy_two_sided(2.0), rel=1e-10)  # 0.2952
  # TOST within delta 0.5: the lower test t1 = (0.2 + 0.5) / 0.1 = 7, the upper
  # t2 = (0.2 - 0.5) / 0.1 = -3 (for d > 0); p = max(P(T > t1), P(T < t2)), df = 1.
  t1, t2 = (sign * 0.2 + 0.5) / 0.1, (sign * 0.2 - 0.5) / 0.1
  p_low = 0.5 - math.atan(t1) / math.pi
  p_up = 0.5 + math.atan(t2) / math.pi
  assert c.p_tost == pytest.approx(max(p_low, p_up), rel=1e-9)


def test_welch_test_of_two_samples_of_two_by_hand():
  """Equal variances and n = 2 each: Welch's df is 2, t = diff / sqrt(va/2 + vb/2)."""
  c = st.compare([1.0, 3.0], [0.0, 2.0], delta=0.1, paired=False)
  t = 1.0 / math.sqrt(2 / 2 + 2 / 2)
  assert not c.paired and c.diff == pytest.approx(1.0)
  assert c.p == pytest.approx(t2_two_sided(t), rel=1e-10)
  # Reversed, the other tail, the same p.
  assert st.compare([0.0, 2.0], [1.0, 3.0], 0.1, False).p == pytest.approx(c.p, rel=1e-12)


def test_pairing_removes_the_shared_seed_effect():
  """Seed effects shared by both arms: unpaired the difference drowns, paired it shows."""
  seed_effect = np.array([0.0, 0.3, -0.2, 0.5, 0.1])
  base = 2.0 + seed_effect
  arm = base - 0.02 + np.array([0.001, -0.001, 0.002, 0.0, -0.002])
  paired, unpaired = st.compare(arm, base, 0.005, True), st.compare(arm, base, 0.005, False)
  assert paired.p < 1e-4 < 0.5 < unpaired.p
  assert paired.mde < 0.005 < unpaired.mde


def test_holm_by_hand():
  d = np.array([-0.2, 0.0, -0.1, -0.15, -0.05])
  comps = {n: st.Comparison(True, 5, -0.1, -0.2, 0.0, p, 0.9, 0.1, 0.1, 10, 0.01, a=d,
                            b=np.zeros(5)) for n, p in (('a', 0.01), ('b', 0.04), ('c', 0.03))}
  st.verdicts(comps)
  # sorted 0.01, 0.03, 0.04 -> 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 1 x 0.04)
  assert [comps[n].p_holm for n in 'abc'] == pytest.approx([0.03, 0.06, 0.06])
  assert [comps[n].verdict for n in 'abc'] == ['better', 'inconclusive', 'inconclusive']


def _noncentral_power(effect, n, paired):
  """Power of the two-sided t-test at 5%, from the noncentral t (scipy, not statsmodels)."""
  df = n - 1 if paired else 2 * n - 2
  nc = effect * math.sqrt(n if paired else n / 2)
  crit = stats.t.ppf(0.975, df)
  return 1 - stats.nct.cdf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)


@pytest.mark.parametrize('paired', [True, False])
def test_power_minimum_detectable_effect_and_seeds(paired):
  for n in (3, 5, 12):
    effect = st.effect_for_power(n, paired)
    assert _noncentral_power(effect, n, paired) == pytest.approx(0.8, abs=1e-4)
  # Cohen's table values (G*Power): d = 1 needs 10 pairs, or 17 per group; d = 0.5, 34 pairs.
  assert st.seeds_for_power(1.0, True) == 10 and st.seeds_for_power(1.0, False) == 17
  assert st.seeds_for_power(0.5, True) == 34
  n = st.seeds_for_power(0.7, paired)  # enough and no more
  assert _noncentral_power(0.7, n, paired) >= 0.8 > _noncentral_power(0.7, n - 1, paired)
  assert st.effect_for_power(1, paired) == math.inf


def test_holm_equals_statsmodels_and_its_levels_decide_alike(monkeypatch):
  """Adjusted p-values as statsmodels' multipletests gives them (ties, ones, nan as untestable);
  each hypothesis is rejected (adjusted p <= 0.05) exactly when its p is within the level the
  step-down spent on it."""
  import gc
  from statsmodels.stats import multitest
  monkeypatch.setattr(gc, 'collect', lambda *a: 0)  # multipletests collects on every call
  rng = np.random.default_rng(3)
  cases = [[0.01, 0.04, 0.03], [0.02, 0.02, 0.02], [0.001, 0.5, 0.0125, 0.013], [1.0, 0.0]]
  cases += [list(rng.uniform(0, 0.08, rng.integers(1, 6))) for _ in range(200)]
  for ps in cases:
    adjusted, levels = st.holm(ps)
    assert adjusted == pytest.approx(list(multitest.multipletests(ps, method='holm')[1]),
                                     abs=1e-15)
    assert [q <= 0.05 for q in adjusted] == [p <= lv for p, lv in zip(ps, levels)], ps
  assert st.holm([0.001, math.nan])[0] == [0.002, 1.0]
  # By hand: sorted 0.001, 0.0125, 0.013, 0.5 at 0.05/4, 0.05/3, 0.05/2: the first two pass,
  # the third fails 0.025? no: 0.013 <= 0.025 passes, 0.5 > 0.05 stops.
  assert st.holm([0.001, 0.5, 0.0125, 0.013])[1] == pytest.approx([0.0125, 0.05, 0.05 / 3, 0.025])
  # A kept hypothesis holds every later one to its own level.
  assert st.holm([0.02, 0.03, 0.04])[1] == pytest.approx([0.05 / 3] * 3)


def test_the_intervals_by_hand():
  """Paired: mean +- t(1 - a/2, n - 1) sd / sqrt(n); Welch: its own degrees of freedom; the
  one-sided form (the two one-sided tests at a): t(1 - a)."""
  a, b = np.array([2.0, 2.3, 2.1, 2.6]), np.array([1.9, 2.0, 2.2, 2.3])
  c = st.compare(a, b, 0.5, True)
  d = a - b
  se = d.std(ddof=1) / 2
  for level in (0.95, 0.99):
    half = stats.t.ppf(1 - (1 - level) / 2, 3) * se
    assert c.interval(level) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-12)
  half = stats.t.ppf(0.95, 3) * se
  assert c.interval(0.95, one_sided=True) == pytest.approx((d.mean() - half, d.mean() + half))
  assert (c.low, c.high) == pytest.approx(c.interval(0.95))  # compare()'s default: 95%
  u = st.compare(a, b[:3], 0.5, False)
  va, vb = a.var(ddof=1) / 4, b[:3].var(ddof=1) / 3
  df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)
  half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
  diff = a.mean() - b[:3].mean()
  assert u.interval(0.95) == pytest.approx((diff - half, diff + half), rel=1e-12)


def test_every_verdict_agrees_with_its_interval():
  """Random small samples (2-6 seeds, paired and not, 1-3 arms, 1-3 looks): better or worse
  exactly when the printed interval excludes 0 (on its side); equivalent exactly with the
  interval of the two one-sided tests, inside +-delta; inconclusive with an interval holding 0.
  The level printed is the one the verdict's test spent."""
  rng = np.random.default_rng(7)
  seen = set()
  for trial in range(300):
    n, arms, looks = rng.integers(2, 7), rng.integers(1, 4), int(rng.integers(1, 4))
    paired, delta = bool(rng.integers(2)), float(rng.choice([0.05, 0.2, 1.0]))
    base = rng.normal(2.0, 0.5, n)
    comps = {}
    for i in range(arms):
      shift = float(rng.choice([0.0, 0.1, -0.3, 1.5]))
      arm = (base + shift + rng.normal(0, 0.1, n)) if paired else rng.normal(2 + shift, 0.2, n)
      comps[f'a{i}'] = st.compare(arm, base, delta, paired, power=False)
    st.verdicts(comps, looks=looks)
    for c in comps.values():
      seen.add(c.verdict)
      assert c.looks == looks
      if c.verdict == 'equivalent':
        assert -delta < c.low <= c.high < delta
        assert c.level == pytest.approx(1 - 2 * c.alpha_tost)
        assert (c.low, c.high) == pytest.approx(c.interval(1 - c.alpha_tost, one_sided=True))
      else:
        assert c.level == pytest.approx(1 - c.alpha)
        assert (c.low, c.high) == pytest.approx(c.interval(c.level))
        excludes = c.low > 0 or c.high < 0
        assert excludes == c.verdict.startswith(('better', 'worse')), (c.verdict, c)
        if c.verdict.startswith('better'):
          assert c.high < 0
        if c.verdict.startswith('worse'):
          assert c.low > 0
  assert {'better', 'worse', 'equivalent', 'inconclusive'} <= seen


def test_looks_divide_the_level():
  """One arm, p 0.02: decided at one look, not at three (0.02 x 3 > 0.05), and its interval
  widens from 95% to 1 - 0.05 / 3."""
  base = np.array([2.0, 2.4, 1.9, 2.2, 2.1, 2.5])
  d = np.array([0.01, 0.03, 0.02, 0.05, 0.0, 0.04])  # t = 3.27 on 5 degrees of freedom
  c = st.compare(base + d, base, 0.001, True, power=False)
  assert c.p == pytest.approx(2 * stats.t.sf(d.mean() / (d.std(ddof=1) / math.sqrt(6)), 5))
  assert 0.05 / 3 < c.p < 0.05
  one = st.verdicts({'x': c})['x']
  assert one.verdict == 'worse' and one.level == pytest.approx(0.95) and one.low > 0
  three = st.verdicts({'x': st.compare(c.a, c.b, 0.001, True, power=False)}, looks=3)['x']
  assert three.verdict == 'inconclusive' and three.p_holm == pytest.approx(3 * c.p)
  assert three.level == pytest.approx(1 - 0.05 / 3) and three.low < 0 < three.high


@pytest.mark.parametrize('shift,delta,verdict', [
    (-0.1, 0.01, 'better'), (0.1, 0.01, 'worse'), (0.0, 0.05, 'equivalent'),
    (-0.02, 0.1, 'better, within delta'), (0.0, 0.0001, 'inconclusive')])
def test_verdicts_both_tails_equivalence_and_too_small(shift, delta, verdict):
  rng = np.random.default_rng(1)
  base = 2.0 + rng.normal(0, 0.3, 8)
  noise = rng.normal(0, 0.002 if verdict != 'inconclusive' else 0.05, 8)
  comps = st.verdicts({'arm': st.compare(base + shift + noise, base, delta, True)})
  assert comps['arm'].verdict == verdict, comps['arm']


def test_a_constant_difference_is_decided_without_a_t_statistic():
  """Every seed gives the same difference (sd 0): scipy's t is undefined; the difference is
  certain and inside (or outside) the margin."""
  a, b = [2.25, 2.5, 2.75], [2.0, 2.25, 2.5]  # exactly 0.25 apart
  c = st.compare(a, b, 0.5, True)
  assert (c.sd, c.p, c.p_tost) == (0.0, 0.0, 0.0)
  c = st.compare(a, b, 0.125, True)
  assert (c.p, c.p_tost) == (0.0, 1.0)
  # On the margin itself: equivalence needs |difference| < delta, strictly.
  c = st.compare(a, b, 0.25, True)
  assert (c.p, c.p_tost) == (0.0, 1.0)


def test_unpaired_is_welch_not_the_pooled_t_test():
  """Unequal variances and sizes: Welch's t and Welch-Satterthwaite degrees of freedom by hand
  (the pooled-variance test gives another p)."""
  a, b = np.array([1.0, 3.0, 2.5, 4.0]), np.array([0.0, 0.1, 0.3])
  va, vb = a.var(ddof=1) / 4, b.var(ddof=1) / 3
  t = (a.mean() - b.mean()) / math.sqrt(va + vb)
  df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)
  want = 2 * stats.t.sf(abs(t), df)
  c = st.compare(a, b, 0.1, paired=False)
  assert c.p == pytest.approx(want, rel=1e-9)
  assert abs(c.p - stats.ttest_ind(a, b).pvalue) > 1e-3  # the pooled test differs here
