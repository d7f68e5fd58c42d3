"""The selection bias's update rules by hand (quantile balancing: worked numbers, its balancing
effect, the layer's update from the batch's own scores; damped updates: by hand and through
train steps), and the dead-expert count of an evaluation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from moejax.config import base_config
from moejax.moe import balance
from moejax.moe.layer import MoEFFN


def test_quantile_update_by_hand():
  # 4 tokens, 2 experts, top-1: each expert's share is 1/2, so tau_i is the median of its
  # scores (linear interpolation): expert 0 sorted 0.1 0.3 0.8 0.9 -> 0.55; expert 1 sorted
  # 0.1 0.2 0.7 0.9 -> 0.45. mean(tau) = 0.5, target = 0.5 - tau = [-0.05, 0.05].
  scores = jnp.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])
  got = balance.bias_update(None, 1.0, 'quantile', jnp.zeros(2), scores, k=1)
  np.testing.assert_allclose(got, [-0.05, 0.05], atol=1e-7)
  # From a bias of [0.1, -0.1] at rate 0.5: half the way to the target.
  got = balance.bias_update(None, 0.5, 'quantile', jnp.array([0.1, -0.1]), scores, k=1)
  np.testing.assert_allclose(got, [-0.075, 0.075], atol=1e-7)


def test_quantile_bias_evens_a_skewed_batch():
  """Every token prefers expert 0; after one quantile step (rate 1) the loads even out."""
  rng = np.random.default_rng(0)
  t, n, k = 512, 8, 2
  scores = jax.nn.sigmoid(jnp.asarray(rng.normal(size=(t, n)) + np.linspace(2, -2, n)))
  def loads(bias):
    index = jax.lax.top_k(scores + bias, k)[1]
    return np.bincount(np.asarray(index).ravel(), minlength=n)
  before = loads(jnp.zeros(n))
  bias = balance.bias_update(None, 1.0, 'quantile', jnp.zeros(n), scores, k)
  after = loads(bias)
  assert before.max() > 2.5 * t * k / n  # skewed: expert 0 takes far more than its share
  assert after.max() < 1.3 * t * k / n and after.min() > 0.7 * t * k / n
  # Each expert's threshold sits where it would take exactly its share K/N.
  tau = np.quantile(np.asarray(scores), 1 - k / n, axis=0)
  np.testing.assert_allclose(bias, tau.mean() - tau, rtol=1e-5, atol=1e-6)


def test_layer_returns_the_quantile_update_of_its_batch():
  moe = base_config().model.moe
  moe.num_experts, moe.num_experts_per_tok, moe.expert_ffn_dim = 4, 1, 8
  moe.num_shared_experts, moe.router.score_fn = 0, 'sigmoid'
  moe.balance.bias_update_rate, moe.balance.bias_update = 1.0, 'quantile'
  layer = MoEFFN(moe, 16)
  x = jax.random.normal(jax.random.key(0), (2, 8, 16))
  variables = layer.init(jax.random.key(1), x)
  variables = {**variables, 'moe_state': {'bias': jnp.array([0.2, 0.0, -0.1, 0.0])}}
  (_, aux), updates = layer.apply(variables, x, None, True, mutable=['bias_updates'])
  w = np.asarray(nn.unbox(variables['params'])['router']['w'])
  scores = 1 / (1 + np.exp(-(np.asarray(x).reshape(16, 16) @ w)))  # the router's, by hand
  tau = np.quantile(scores, 1 - 1 / 4, axis=0)
  want = (tau.mean() - tau) - np.array([0.2, 0.0, -0.1, 0.0])
  np.testing.assert_allclose(updates['bias_updates']['bias'], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('rule', ['sign', 'proportional'])
def test_count_rules_unchanged(rule):
  counts = jnp.array([6.0, 2.0, 0.0, 4.0])  # mean 3
  got = balance.bias_update(counts, 0.1, rule)
  want = (0.1 * np.sign([-3, 1, 3, -1]) if rule == 'sign' else
          0.1 * np.array([-3, 1, 3, -1]) / 3)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_damped_update_by_hand():
  # counts [6, 2, 0, 4], mean 3: g = (3 - c) / 3 = [-1, 1/3, 1, -1/3].
  counts = jnp.array([6.0, 2.0, 0.0, 4.0])
  g = np.array([-1, 1 / 3, 1, -1 / 3])
  m0, b0 = jnp.array([0.5, 0.0, 0.0, -0.5]), jnp.array([0.9, 0.0, -0.2, 0.0])
  b, m = balance.damped_update(counts, 0.1, b0, m0, beta=0.8, clamp=1.0)
  want_m = 0.8 * np.asarray(m0) + 0.2 * g
  np.testing.assert_allclose(m, want_m, rtol=1e-6)
  np.testing.assert_allclose(b, np.tanh(np.asarray(b0) + 0.1 * want_m), rtol=1e-6)
  b, _ = balance.damped_update(counts, 0.1, b0, m0, beta=0.8, clamp=0.0)  # no clamp
  np.testing.assert_allclose(b, np.asarray(b0) + 0.1 * want_m, rtol=1e-6)
  # However long an expert stays overloaded, the clamped bias stays inside (-clamp, clamp).
  b, m = b0, m0
  for _ in range(200):
    b, m = balance.damped_update(counts, 0.5, b, m, beta=0.8, clamp=0.3)
  assert np.abs(np.asarray(b)).max() < 0.3


def test_damped_rule_through_train_steps():
  """Two train steps with bias_update='damped': the state carries a momentum per MoE layer and
  both move exactly as damped_update says from the step's own expert counts."""
  from conftest import tiny_config, trainer_on
  c = tiny_config()
  b = c.model.moe.balance
  b.bias_update_rate, b.bias_update, b.bias_momentum, b.bias_clamp = 0.05, 'damped', 0.5, 0.2
  trainer = trainer_on(c, {'data': 1})
  state = trainer.init(0)
  rng = np.random.default_rng(0)
  for _ in range(2):
    before = jax.device_get(state.model_state['moe_state'])
    tokens = rng.integers(0, 256, (8, 17)).astype(np.int32)
    state, m = trainer.train_step(state, {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]})
    after = jax.device_get(state.model_state['moe_state'])
    counts = np.asarray(jax.device_get(m['moe/expert_load'])) * 8 * 16 * 2  # shares -> counts
    layer = before['moe_layers']['moe_block']['moe']
    for i in range(counts.shape[0]):
      want_b, want_m = balance.damped_update(jnp.asarray(counts[i]), 0.05, layer['bias'][i],
                                             layer['bias_momentum'][i], 0.5, 0.2)
      got = after['moe_layers']['moe_block']['moe']
      np.testing.assert_allclose(got['bias_momentum'][i], want_m, rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(got['bias'][i], want_b, rtol=1e-4, atol=1e-6)
  assert np.abs(np.asarray(after['moe_layers']['moe_block']['moe']['bias'])).max() > 0


def test_dead_experts_are_counted_over_the_whole_evaluation_set():
  """An expert idle in one batch but used in another is alive; one never used is dead."""
  from moejax.training.loop import evaluate

  class Fake:
    def __init__(self):
      self.loads = iter([np.array([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]),
                         np.array([[0.5, 0.0, 0.5, 0.0], [0.5, 0.5, 0.0, 0.0]])])

    def eval_step(self, state, batch):
      return {'eval/loss': np.float32(1.0), 'expert_load': next(self.loads),
              'dropped_fraction': np.float32(0.0), 'active_experts': np.array([2.0, 1.0])}
  out = evaluate(Fake(), None, [None, None])
  assert out['eval/per_layer/active_experts'] == [2.0, 1.0]
  assert out['eval/per_layer/dead_experts'] == [1, 0]  # layer 0: expert 3 never used
  assert out['eval/dead_experts'] == 0.5
