"""DeepSeek-V3 sigmoid routing, group-limited selection, loss-free bias, noisy top-K, hash
routing and the sequence-wise loss: hand-worked cases and properties."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from moejax.config import base_config
from moejax.moe import balance, losses
from moejax.moe.routers.hashing import HashRouter
from moejax.moe.routers.noisy import NoisyTopKRouter
from moejax.moe.routers.topk import TopKRouter
from moejax.moe.types import RouterOutput
from moejax.moe.routers.base import group_limited
from moejax.moe.routers.hashing import hash_table

from conftest import build_router


def _cfgs(router=None, bal=None):
  moe = base_config().model.moe
  for k, v in (router or {}).items():
    moe.router[k] = v
  for k, v in (bal or {}).items():
    moe.balance[k] = v
  return (ml_collections.FrozenConfigDict(moe.router),
          ml_collections.FrozenConfigDict(moe.balance))


V3 = dict(score_fn='sigmoid', norm_topk_prob=True, routed_scaling_factor=2.5)


def _v3(n=4, k=2, bias=None, **router):
  r, b = _cfgs({**V3, **router}, {'bias_update_rate': 1e-3})
  variables = {'params': {'w': jnp.eye(n)}, 'moe_state': {'bias': jnp.zeros(n) if bias is None
                                                          else jnp.asarray(bias, jnp.float32)}}
  return _Biased(build_router(TopKRouter, r, n, k)), variables


class _Biased:
  """A router called as the MoE layer calls it: with the state's selection bias."""

  def __init__(self, router):
    self.router = router

  def apply(self, v, x, **kw):
    return self.router.apply({'params': v['params']}, x, bias=v['moe_state']['bias'], **kw)


def test_sigmoid_router_hand_worked():
  # logits [0, 1, 2, -1] -> s = [0.5, 0.731059, 0.880797, 0.268941]
  x = jnp.array([[0., 1., 2., -1.]])
  router, v = _v3()
  r = router.apply(v, x, train=False)
  np.testing.assert_array_equal(r.expert_index, [[2, 1]])
  np.testing.assert_allclose(r.combine_weights, [[1.366123, 1.133877]], atol=1e-5)  # 2.5 * s/sum
  # bias [.5, 0, -.5, 0]: s + b = [1.0, .731, .381, .269] -> experts 0, 1; the weights still
  # come from s alone: 2.5 * (0.5, 0.731059) / 1.231059.
  router, v = _v3(bias=[.5, 0, -.5, 0])
  r = router.apply(v, x, train=False)
  np.testing.assert_array_equal(r.expert_index, [[0, 1]])
  np.testing.assert_allclose(r.combine_weights, [[1.015386, 1.484614]], atol=1e-5)
  np.testing.assert_allclose(r.probs.sum(-1), 1.0, rtol=1e-6)  # normalised affinities


@pytest.mark.parametrize('seed', range(5))
def test_bias_changes_selection_never_weights(seed):
  x = jax.random.normal(jax.random.key(seed), (32, 8))
  bias = jax.random.normal(jax.random.key(seed + 100), (8,))
  router, v = _v3(n=8, k=3, bias=bias)
  r = router.apply(v, x, train=False)
  s = jax.nn.sigmoid(x)
  chosen = jnp.take_along_axis(s, r.expert_index, -1)
  np.testing.assert_allclose(r.combine_weights, 2.5 * chosen / chosen.sum(-1, keepdims=True),
                             rtol=1e-6)
  np.testing.assert_allclose(r.combine_weights.sum(-1), 2.5, rtol=1e-6)
  unbiased = router.apply(_v3(n=8, k=3)[1], x, train=False)
  assert not np.array_equal(r.expert_index, unbiased.expert_index)


SCORES = jnp.array([[0.9, 0.1, 0.6, 0.55, 0.8, 0.05, 0.3, 0.3]])  # 4 groups of 2


def test_group_limited_v3_top2_sum_hand_worked():
  # group scores (sum of top-2): 1.0, 1.15, 0.85, 0.6 -> keep groups 1 and 0
  masked = group_limited(SCORES, 4, 2, 'top2_sum')
  assert np.isneginf(masked[0, 4:]).all() and np.isfinite(masked[0, :4]).all()
  assert list(jax.lax.top_k(masked, 2)[1][0]) == [0, 2]  # unrestricted would be [0, 4]


def test_device_limited_v2_max_hand_worked():
  # group scores (max): 0.9, 0.6, 0.8, 0.3 -> keep groups 0 and 2
  masked = group_limited(SCORES, 4, 2, 'max')
  assert list(np.isfinite(masked[0])) == [1, 1, 0, 0, 1, 1, 0, 0]
  assert list(jax.lax.top_k(masked, 2)[1][0]) == [0, 4]


@pytest.mark.parametrize('score', ['top2_sum', 'max'])
def test_all_groups_kept_equals_unrestricted(score):
  x = jax.random.normal(jax.random.key(0), (64, 16))
  for groups in (1, 2, 4, 8):
    np.testing.assert_array_equal(group_limited(x, groups, groups, score), x)
  router, v = _v3(n=16, k=4)
  plain = router.apply(v, x, train=False)
  grouped_router, _ = _v3(n=16, k=4, num_groups=4, topk_groups=4, group_score=score)
  g = grouped_router.apply(v, x, train=False)
  np.testing.assert_array_equal(plain.expert_index, g.expert_index)
  np.testing.assert_allclose(plain.combine_weights, g.combine_weights)


def test_masking_with_zero_instead_of_minus_inf_picks_masked_experts():
  """One public reference fills dropped groups with 0.0, not -inf. With a negative bias the
  biased scores in the kept groups can be below 0, and then masked experts win: -inf (the
  paper) keeps the choice inside the kept groups."""
  choice = jnp.array([[-0.1, -0.2, -0.15, -0.3, -0.5, -0.6, -0.7, -0.8]])
  # group scores: -0.3, -0.45, -1.1, -1.5 -> keep groups 0 and 1 (experts 0-3)
  ours = jax.lax.top_k(group_limited(choice, 4, 2, 'top2_sum'), 2)[1]
  kept = jnp.isfinite(group_limited(choice, 4, 2, 'top2_sum'))
  zero_filled = jnp.where(kept, choice, 0.0)
  theirs = jax.lax.top_k(zero_filled, 2)[1]
  assert list(ours[0]) == [0, 2]
  assert set(np.asarray(theirs[0]).tolist()) <= {4, 5, 6, 7}  # experts of masked groups


def _skewed_bias_run(update, steps=150, rate=0.01):
  """The loss-free loop in miniature: route with the bias, count, apply the layer's update."""
  n, t = 4, 64
  r, b = _cfgs({**V3, 'norm_topk_prob': True}, {'bias_update_rate': rate, 'bias_update': update})
  router = build_router(TopKRouter, r, n, 1)
  x = jax.random.normal(jax.random.key(0), (t, n)) + jnp.array([2.0, 1.0, 0.0, -1.0])
  params = {'w': jnp.eye(n)}

  @jax.jit
  def step(bias):
    out = router.apply({'params': params}, x, train=True, bias=bias)
    counts = losses.expert_counts(out.expert_index, n)
    return (bias + balance.bias_update(counts, rate, update),
            balance.load_stats(losses.expert_counts(out.expert_index, n), out.probs)['max_vio'])

  bias, vios = jnp.zeros(n), []
  for _ in range(steps):
    bias, vio = step(bias)
    vios.append(float(vio))
  return np.asarray(bias), vios


@pytest.mark.parametrize('update', ['sign', 'proportional'])
def test_loss_free_bias_moves_toward_balance(update):
  bias, vios = _skewed_bias_run(update)
  assert vios[0] > 1.5  # the skewed router sends most tokens to expert 0
  assert np.mean(vios[-20:]) < 0.35 * vios[0]
  assert bias[0] < 0 < bias[3]  # the overloaded expert is pushed down, the idle one up


def test_bias_update_hand_worked():
  """Expert 0 got all 8 tokens (mean 2): sign rule -u for it, +u for the others;
  proportional: u * (2 - c) / 2 = -3u, +u, +u, +u."""
  counts = jnp.array([8., 0., 0., 0.])
  np.testing.assert_allclose(balance.bias_update(counts, 1e-3, 'sign'), [-1e-3, 1e-3, 1e-3, 1e-3])
  np.testing.assert_allclose(balance.bias_update(counts, 1e-3, 'proportional'),
                             [-3e-3, 1e-3, 1e-3, 1e-3], rtol=1e-6)


def test_softmax_router_with_bias():
  r, b = _cfgs({'norm_topk_prob': False}, {'bias_update_rate': 1e-3})
  router = build_router(TopKRouter, r, 4, 1)
  x = jnp.array([[2., 1., 0., -1.]])
  out = router.apply({'params': {'w': jnp.eye(4)}}, x, train=False,
                     bias=jnp.array([0., 0.5, 0., 0.]))
  assert int(out.expert_index[0, 0]) == 1  # p = .644, .237 + .5 = .737
  np.testing.assert_allclose(out.combine_weights[0, 0], 0.236883, atol=1e-6)


def test_noisy_topk():
  r, b = _cfgs()
  router = build_router(NoisyTopKRouter, r, 8, 2)
  x = jax.random.normal(jax.random.key(0), (16, 8))
  v = nn.unbox(router.init({'params': jax.random.key(1), 'router': jax.random.key(2)}, x))
  clean = router.apply(v, x, train=False)
  logits = x @ v['params']['w']
  np.testing.assert_array_equal(clean.expert_index, jax.lax.top_k(logits, 2)[1])
  np.testing.assert_allclose(clean.combine_weights,
                             jax.nn.softmax(jax.lax.top_k(logits, 2)[0]), rtol=1e-5)
  noisy = router.apply(v, x, train=True, rngs={'router': jax.random.key(3)})
  assert not np.array_equal(noisy.expert_index, clean.expert_index)
  np.testing.assert_allclose(noisy.combine_weights.sum(-1), 1.0, rtol=1e-6)
  # The noise scale is learned: gradients reach w_noise.
  g = jax.grad(lambda p: jnp.sum(router.apply({'params': p}, x, train=True, rngs={
      'router': jax.random.key(3)}).combine_weights[:, 0]))(v['params'])
  assert float(jnp.abs(g['w_noise']).sum()) > 0


def test_jitter_only_in_training():
  r, b = _cfgs({'jitter': 0.1})
  router = build_router(TopKRouter, r, 4, 2)
  x = jax.random.normal(jax.random.key(0), (8, 4))
  v = {'params': {'w': jnp.eye(4)}}
  np.testing.assert_allclose(router.apply(v, x, train=False).logits, x, rtol=1e-6)
  jittered = router.apply(v, x, train=True, rngs={'router': jax.random.key(1)}).logits
  ratio = np.asarray(jittered / x)
  assert not np.allclose(ratio, 1.0) and (ratio > 0.9 - 1e-6).all() and (ratio < 1.1 + 1e-6).all()


@pytest.mark.parametrize('kind', ['random', 'balanced'])
def test_hash_routing_deterministic_distinct(kind):
  t1 = hash_table(258, 8, 2, kind, seed=0)
  np.testing.assert_array_equal(t1, hash_table(258, 8, 2, kind, seed=0))
  assert (t1[:, 0] != t1[:, 1]).all()
  r, b = _cfgs({'name': 'hash', 'hash_kind': kind})
  router = build_router(HashRouter, r, 8, 2)
  ids = jnp.array([5, 5, 77, 200])
  out = router.apply({}, jnp.zeros((4, 3)), ids)
  np.testing.assert_array_equal(out.expert_index, t1[np.asarray(ids)])
  np.testing.assert_allclose(out.combine_weights, 0.5)


def test_balanced_hash_spreads_the_vocabulary_evenly():
  table = hash_table(258, 8, 2, 'balanced', 0)
  for j in range(2):
    counts = np.bincount(table[:, j], minlength=8)
    assert counts.max() - counts.min() <= 1


def test_sequence_aux_loss_uniform_and_hand_worked():
  # Uniform: perfectly balanced choices within every sequence, uniform affinities -> 1.
  n, k, b, s = 4, 2, 3, 8
  index = jnp.tile(jnp.arange(s * k).reshape(s, k) % n, (b, 1))
  r = RouterOutput(index, jnp.full((b * s, k), .5), jnp.full((b * s, n), 1 / n),
                   jnp.zeros((b * s, n)))
  assert float(losses.sequence_aux_loss(r, n, b)) == pytest.approx(1.0, abs=1e-6)
  # Hand-worked: one sequence of 2 tokens, N=2, K=1, both to expert 0 with affinity .75/.25:
  # f = 2/(1*2) * (2, 0) = (2, 0); P = (.75, .25); sum f P = 1.5
  r = RouterOutput(jnp.array([[0], [0]]), jnp.ones((2, 1)), jnp.array([[.75, .25]] * 2),
                   jnp.zeros((2, 2)))
  assert float(losses.sequence_aux_loss(r, 2, 1)) == pytest.approx(1.5)


def _uniform_output(t, n, k):
  index = (jnp.arange(t * k).reshape(t, k)) % n
  return RouterOutput(index, jnp.full((t, k), 1.0 / k), jnp.full((t, n), 1.0 / n),
                      jnp.zeros((t, n)))


@pytest.mark.parametrize('devices', [1, 2, 4])
def test_device_and_comm_losses_are_one_under_uniform_routing(devices):
  r = _uniform_output(t=32, n=8, k=2)
  assert float(losses.device_balance_loss(r, 8, devices)) == pytest.approx(1.0, abs=1e-6)
  # Token t takes experts 2t mod 8 and 2t+1 mod 8, which share a device for devices <= 4, so
  # every token reaches exactly M = 1 device and each device gets T / devices tokens.
  assert float(losses.comm_balance_loss(r, 8, devices, 1)) == pytest.approx(1.0, abs=1e-6)


def test_device_and_comm_losses_hand_worked():
  # N=4 experts on 2 devices ({0,1}, {2,3}); T=2, K=2.
  # token 0 -> experts 0, 1 (device 0 only); token 1 -> experts 1, 2 (devices 0 and 1).
  # P = mean probs = (.4, .3, .2, .1).
  r = RouterOutput(jnp.array([[0, 1], [1, 2]]), jnp.full((2, 2), .5),
                   jnp.array([[.5, .3, .1, .1], [.3, .3, .3, .1]]), jnp.zeros((2, 4)))
  # f_i = N/(K T) count_i = 4/4 * (1, 2, 1, 0) = (1, 2, 1, 0); f'_d = (1.5, .5);
  # P'_d = (.7, .3): loss = 1.5 * .7 + .5 * .3 = 1.2
  assert float(losses.device_balance_loss(r, 4, 2)) == pytest.approx(1.2, abs=1e-6)
  # tokens sent: device 0 <- 2, device 1 <- 1; M=2: f'' = 2/(2*2) * (2, 1) = (1, .5);
  # loss = 1 * .7 + .5 * .3 = .85
  assert float(losses.comm_balance_loss(r, 4, 2, 2)) == pytest.approx(0.85, abs=1e-6)


def test_importance_loss_hand_worked():
  # gates summed per expert: (.5, .5 + .5, .5, 0) = (.5, 1, .5, 0): mean .5, var .125 -> .5
  r = RouterOutput(jnp.array([[0, 1], [1, 2]]), jnp.full((2, 2), .5), jnp.zeros((2, 4)),
                   jnp.zeros((2, 4)))
  assert float(losses.importance_loss(r, 4)) == pytest.approx(0.5, abs=1e-6)
  assert float(losses.importance_loss(_uniform_output(32, 8, 2), 8)) == pytest.approx(0.0)


def test_sinkhorn_balances_a_skewed_router():
  from moejax.moe.routers.sinkhorn import SinkhornRouter
  from moejax.moe.routers.sinkhorn import sinkhorn
  n, t = 4, 64
  x = jax.random.normal(jax.random.key(0), (t, n)) + jnp.array([2.0, 1.0, 0.0, -1.0])
  plan = jnp.exp(sinkhorn(x, 50))
  np.testing.assert_allclose(plan.sum(1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(plan.sum(0), t / n, rtol=1e-3)
  r, b = _cfgs({'name': 'sinkhorn', 'sinkhorn_iters': 20, 'norm_topk_prob': False})
  router = build_router(SinkhornRouter, r, n, 1)
  v = {'params': {'w': jnp.eye(n)}}
  greedy_out = router.apply(v, x, train=False)
  greedy = balance.load_stats(losses.expert_counts(greedy_out.expert_index, n),
                              greedy_out.probs)['max_vio']
  out = router.apply(v, x, train=True)
  balanced = balance.load_stats(losses.expert_counts(out.expert_index, n), out.probs)['max_vio']
  assert float(greedy) > 1.5 and float(balanced) < 0.3
  # Weights are the router's probabilities of the chosen experts (no renormalisation here).
  np.testing.assert_allclose(out.combine_weights[:, 0],
                             jnp.take_along_axis(jax.nn.softmax(x), out.expert_index, -1)[:, 0],
                             rtol=1e-6)


def test_smooth_load_hand_worked():
  from moejax.moe.routers.noisy import smooth_load
  # K=1. noisy [2.5, .5, .2]: expert 0 is in the top 1, its threshold is the 2nd best (.5);
  # the others must beat the best (2.5). z = ((2 - .5), (1 - 2.5), (0 - 2.5)) / 1
  # Phi(z) = (0.933193, 0.066807, 0.006210)
  load = smooth_load(jnp.array([[2., 1., 0.]]), jnp.array([[2.5, .5, .2]]), jnp.ones((1, 3)), 1)
  np.testing.assert_allclose(load, [0.933193, 0.066807, 0.006210], atol=1e-6)


def test_load_loss_counts_fallback_hand_worked():
  # counts (1, 2, 1, 0): mean 1, variance .5 -> CV^2 = .5
  r = RouterOutput(jnp.array([[0, 1], [1, 2]]), jnp.full((2, 2), .5), jnp.zeros((2, 4)),
                   jnp.zeros((2, 4)))
  assert float(losses.load_loss(r, 4)) == pytest.approx(0.5)


def test_noisy_router_load_loss_has_gradient():
  r, b = _cfgs({'name': 'noisy_topk'})
  router = build_router(NoisyTopKRouter, r, 8, 2)
  x = jax.random.normal(jax.random.key(0), (16, 8))
  v = nn.unbox(router.init({'params': jax.random.key(1), 'router': jax.random.key(2)}, x))
  g = jax.grad(lambda p: losses.load_loss(router.apply({'params': p}, x, train=True, rngs={
      'router': jax.random.key(3)}), 8))(v['params'])
  assert float(jnp.abs(g['w']).sum()) > 0 and float(jnp.abs(g['w_noise']).sum()) > 0


def test_sinkhorn_hand_worked():
  """Logits [[2, 0], [1, 0]]: both tokens prefer expert 0. For a 2x2 kernel the balanced plan
  is [[p, 1-p], [1-p, p]] with the kernel's cross ratio: (p / (1-p))^2 = e^2 * e^0 / (e^1 * e^0)
  = e, so p = sqrt(e) / (1 + sqrt(e)) = 0.622459. Token 0 keeps expert 0, token 1 moves to 1."""
  from moejax.moe.routers.sinkhorn import SinkhornRouter
  from moejax.moe.routers.sinkhorn import sinkhorn
  x = jnp.array([[2., 0.], [1., 0.]])
  p = 0.622459
  np.testing.assert_allclose(jnp.exp(sinkhorn(x, 60)), [[p, 1 - p], [1 - p, p]], atol=1e-5)
  r, b = _cfgs({'name': 'sinkhorn', 'sinkhorn_iters': 60, 'norm_topk_prob': False})
  out = build_router(SinkhornRouter, r, 2, 1).apply(
      {'params': {'w': jnp.eye(2)}}, x, train=True)
  np.testing.assert_array_equal(out.expert_index, [[0], [1]])
  # gate weights: softmax probabilities of the chosen experts: (e^2/(e^2+1), 1/(e+1))
  np.testing.assert_allclose(out.combine_weights, [[0.880797], [0.268941]], atol=1e-6)
