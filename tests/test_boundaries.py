"""Formulas with a rounding, a grouping or a boundary, on cases chosen so that the plausible
wrong variants (floor for ceil, round for ceil, the batch for the sequence, K forgotten, the
warmup shifted by a step) give different numbers. Every number is worked by hand in a comment."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import base_config
from moejax.data import pipeline
from moejax.moe import balance, losses
from moejax.moe.dispatch.capacity import capacity_slots, expert_capacity
from moejax.moe.routers.expert_choice import ExpertChoiceRouter
from moejax.moe.types import RouterOutput
from moejax.moe.routers.expert_choice import expert_choice_capacity
from moejax.training.step import learning_rate

from conftest import build_router


# ---- Capacity: C = ceil(factor * K * T / N), at least min_capacity, at most T.

@pytest.mark.parametrize('t,k,n,factor,min_c,want', [
    (11, 2, 10, 1.0, 1, 3),   # 2.2: ceil 3; floor 2; round 2
    (10, 2, 8, 1.0, 1, 3),    # 2.5: ceil 3; floor 2; round (half to even) 2
    (10, 2, 8, 1.1, 1, 3),    # 2.75: ceil 3; floor 2; without K: ceil(1.375) = 2
    (12, 1, 8, 1.25, 1, 2),   # 1.875: ceil 2; floor 1
    (12, 1, 8, 1.25, 3, 3),   # min_capacity wins (3 > 2)
    (5, 2, 2, 4.0, 1, 5),     # 20 > T = 5: at most T
])
def test_expert_capacity_rounds_up(t, k, n, factor, min_c, want):
  assert expert_capacity(t, k, n, factor, min_c) == want


def test_capacity_dispatch_keeps_ceil_many_per_expert():
  """T = 10 tokens, K = 1, all to expert 0, N = 4, factor 1.0: C = ceil(2.5) = 3, so exactly
  the first 3 tokens (position priority) keep a slot; floor would keep 2."""
  index = jnp.zeros((10, 1), jnp.int32)
  c = expert_capacity(10, 1, 4, 1.0, 1)
  slots = np.asarray(capacity_slots(index, 4, c, 'position'))[:, 0]
  np.testing.assert_array_equal(slots, [0, 1, 2] + [4 * 3] * 7)


@pytest.mark.parametrize('tokens,n,factor,want', [
    (10, 4, 1.0, 3),  # 2.5: ceil 3; floor 2
    (9, 4, 1.0, 3),   # 2.25: ceil 3; round 2
    (3, 8, 1.0, 1),   # 0.375: at least 1
    (4, 1, 2.0, 4),   # 8 > T = 4: at most T
])
def test_expert_choice_capacity_rounds_up(tokens, n, factor, want):
  assert expert_choice_capacity(tokens, n, factor) == want


def test_expert_choice_router_takes_ceil_tokens_per_expert():
  """T = 10, N = 4, c = 1.0: every expert takes C = ceil(10 / 4) = 3 distinct tokens."""
  moe = base_config().model.moe
  moe.router.name, moe.router.ec_capacity_factor = 'expert_choice', 1.0
  router = build_router(ExpertChoiceRouter, moe.router, 4, 2)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(10, 4)), jnp.float32)
  ec = router.apply({'params': {'w': jnp.eye(4)}}, x, train=True).expert_choice
  assert ec.token_index.shape == (4, 3)


# ---- Balance losses on several sequences and non-uniform probabilities.

def _out(index, probs, k=None):
  index, probs = jnp.asarray(index, jnp.int32), jnp.asarray(probs, jnp.float32)
  w = jnp.full(index.shape, 1.0 / index.shape[1])
  return RouterOutput(index, w, probs, jnp.log(probs))


def test_sequence_aux_loss_groups_by_sequence():
  """B = 2 sequences of S = 2 tokens, K = 1, N = 2.
  Sequence 0 routes (0, 0), affinities (.9, .1), (.6, .4): f = N/(K S) (2, 0) = (2, 0),
  P = (.75, .25) -> 1.5. Sequence 1 routes (0, 1), affinities (.7, .3), (.2, .8): f = (1, 1),
  P = (.45, .55) -> 1.0. Mean over sequences: 1.25.
  Wrong variants: over the whole batch, f = 2/4 (3, 1) = (1.5, .5), P = (.6, .4) -> 1.1;
  normalised by K B S instead of K S: (.75 + .5) / 2 = .625."""
  r = _out([[0], [0], [0], [1]], [[.9, .1], [.6, .4], [.7, .3], [.2, .8]])
  assert float(losses.sequence_aux_loss(r, 2, 2)) == pytest.approx(1.25, abs=1e-6)


def test_switch_aux_loss_counts_k_choices():
  """T = 3, K = 2, N = 3, index (0, 1), (0, 2), (1, 0): counts (3, 2, 1), f = counts / (K T)
  = (1/2, 1/3, 1/6). P = column means of (.5 .3 .2), (.4 .2 .4), (.3 .6 .1) = (.4, 11/30,
  7/30). N sum f P = 3 (.2 + 11/90 + 7/180) = 1.083333. Without K in f: 2.166667."""
  r = _out([[0, 1], [0, 2], [1, 0]], [[.5, .3, .2], [.4, .2, .4], [.3, .6, .1]])
  assert float(losses.switch_aux_loss(r, 3)) == pytest.approx(13 / 12, abs=1e-6)


def test_device_loss_averages_f_over_a_devices_experts():
  """N = 4 on D = 2 devices, K = 1, T = 4, index (0, 1, 1, 3): f = N/(K T) counts = (1, 2, 0, 1),
  f' = per-device mean = (1.5, .5). P = column means = (.2125, .3125, .1875, .2875), P' =
  per-device sum = (.525, .475). Loss = 1.5 * .525 + .5 * .475 = 1.025; with the sum of f
  instead of the mean: 3 * .525 + 1 * .475 = 2.05."""
  probs = [[.4, .3, .2, .1], [.1, .6, .1, .2], [.25, .25, .25, .25], [.1, .1, .2, .6]]
  r = _out([[0], [1], [1], [3]], probs)
  assert float(losses.device_balance_loss(r, 4, 2)) == pytest.approx(1.025, abs=1e-6)


def test_max_vio_and_cv_on_uneven_counts():
  """counts (5, 1, 0, 2): mean 2, MaxVio = (5 - 2) / 2 = 1.5; population std =
  sqrt((9 + 1 + 4 + 0) / 4) = sqrt(3.5), CV = 0.935414; load shares (5, 1, 0, 2) / 8."""
  stats = balance.load_stats(jnp.array([5., 1., 0., 2.]), jnp.full((2, 4), .25))
  assert float(stats['max_vio']) == pytest.approx(1.5)
  assert float(stats['cv']) == pytest.approx(math.sqrt(3.5) / 2, abs=1e-6)
  np.testing.assert_allclose(stats['expert_load'], [5 / 8, 1 / 8, 0, 2 / 8])


# ---- The learning-rate schedule: warmup, peak, cosine, end.

def test_learning_rate_schedule_hand_worked():
  """lr 1, warmup 4, 20 steps, end ratio .1: linear from 0 (step 0) to 1 (step 4), then a
  cosine over steps 4-20 down to .1: at step 12 (half way) .1 + .9 * .5 = .55; at step 8 (a
  quarter) .1 + .45 (1 + cos(pi/4)) = .868198. A warmup shifted by one step gives .2 / .75."""
  t = base_config().train
  t.lr, t.warmup_steps, t.steps, t.min_lr_ratio = 1.0, 4, 20, 0.1
  lr = learning_rate(t)
  want = {0: 0.0, 1: .25, 3: .75, 4: 1.0, 8: .1 + .45 * (1 + math.cos(math.pi / 4)), 12: .55,
          20: .1}
  for step, value in want.items():
    assert float(lr(step)) == pytest.approx(value, abs=1e-6), step


# ---- Evaluation: a fixed sample of train.eval_batches batches across the whole split.

def test_eval_batches_sample_the_whole_split_the_same_every_time():
  """200 chunks of 4 + 1 tokens, batch 4: 5 batches are 20 chunks drawn from all over the
  split (not the first 20), in order, the same at every call; a larger sample contains the
  smaller one; 0 (or more than the split) is every whole batch in order."""
  tokens = np.arange(801, dtype=np.int32)
  chunks = pipeline.PackedChunks(tokens, 4)
  assert len(chunks) == 200
  firsts = lambda bs: np.concatenate([b['inputs'][:, 0] for b in bs]) // 4  # noqa: E731
  small = firsts(pipeline.eval_batches(chunks, 4, 5))
  assert len(small) == 20 == len(set(small)) and list(small) == sorted(small)
  assert small.max() >= 150 and small.min() < 50  # both ends of the split contribute
  assert list(firsts(pipeline.eval_batches(chunks, 4, 5))) == list(small)
  large = firsts(pipeline.eval_batches(chunks, 4, 20))
  assert set(small) <= set(large) and len(large) == 80
  everything = firsts(pipeline.eval_batches(chunks, 4, 0))
  assert list(everything) == list(range(200))
  assert list(firsts(pipeline.eval_batches(chunks, 4, 99))) == list(range(200))
  batch = pipeline.eval_batches(chunks, 4, 5)[0]
  np.testing.assert_array_equal(batch['targets'][0], batch['inputs'][0] + 1)  # shifted by one
  es = pipeline.eval_set(chunks, 4, 5)
  assert (es.tokens, es.sequences, es.split_tokens) == (80, 20, 801)
  assert '80 tokens in 20 sequences (10.0% of the split' in es.label()


def test_the_evaluation_loss_is_the_mean_over_sequences_with_its_standard_error():
  """Two batches of two sequences with per-sequence losses 1, 2 and 3, 4: the loss is their
  mean 2.5 and its standard error sd / sqrt(4) = 1.2910 / 2."""
  from moejax.training.loop import evaluate

  class Fake:
    def __init__(self):
      self.rows = iter([np.array([1.0, 2.0]), np.array([3.0, 4.0])])

    def eval_step(self, state, batch):
      rows = next(self.rows)
      return {'eval/loss': np.float32(rows.mean()), 'eval/row_loss': rows}
  out = evaluate(Fake(), None, [None, None])
  assert out['eval/loss'] == pytest.approx(2.5)
  assert out['eval/loss_se'] == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)

