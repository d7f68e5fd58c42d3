"""A variable number of experts per token: null slots in every token-choice dispatch path,
zero-computation experts (MoE++), top-p routing and ReLU routing (ReMoE), by hand and against
the loop-over-experts reference."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from moejax.checks import validate
from moejax.errors import ConfigError
from moejax.moe import balance, losses
from moejax.moe.dispatch.capacity import capacity_slots, drop_stats
from moejax.moe.layer import MoEFFN
from moejax.moe.routers.relu import ReLURouter
from moejax.moe.routers.top_p import TopPRouter
from moejax.moe.routers.topk import TopKRouter

from conftest import build_router, tiny_config
from test_dispatch import _swiglu, loop_reference


def _router_cfg(**kw):
  r = tiny_config().model.moe.router
  for k, v in kw.items():
    r[k] = v
  return ml_collections.FrozenConfigDict(r)


def _apply_router(cls, logits, k, **cfg):
  """Route tokens whose logits are exactly `logits` [T, N']: x = logits, router weight = I."""
  logits = jnp.asarray(logits, jnp.float32)
  n_out = logits.shape[1]
  router = build_router(cls, _router_cfg(**cfg), n_out - cfg.get('null_experts', 0), k)
  params = {'params': {'w': jnp.eye(n_out)}}
  return router.apply(params, logits, train=False)


def test_top_p_takes_experts_until_their_mass_reaches_p():
  # Token 0: p = .5, .3, .15, .05. With p=0.4 one expert (.5 >= .4); with 0.6 two (.5 < .6,
  # .8 >= .6); with 0.9 three, the most K=3 slots allow (.95 >= .9 is reached at the third).
  # Token 1: p = .25 each: 0.4 needs two (.25 < .4), 0.6 three, 0.9 three (capped; K = 3).
  logits = np.log([[.5, .3, .15, .05], [.25, .25, .25, .25]])
  for p, index, weights in [
      (0.4, [[0, 4, 4], [0, 1, 4]], [[.5, 0, 0], [.25, .25, 0]]),
      (0.6, [[0, 1, 4], [0, 1, 2]], [[.5, .3, 0], [.25, .25, .25]]),
      (0.9, [[0, 1, 2], [0, 1, 2]], [[.5, .3, .15], [.25, .25, .25]])]:
    r = _apply_router(TopPRouter, logits, 3, top_p=p)
    np.testing.assert_array_equal(r.expert_index, index, err_msg=f'p={p}')
    np.testing.assert_allclose(r.combine_weights, weights, rtol=1e-6, err_msg=f'p={p}')
  stats = balance.active_experts(r, 4)  # p = 0.9: three experts each
  np.testing.assert_allclose(stats['active_experts_hist'], [0, 0, 0, 1])


def test_top_p_weights_carry_the_router_gradient():
  """The taken slots' weights are the softmax probabilities themselves (the ranking alone is
  cut from the gradient): d/dlogit_i of sum_j c_j w_j = sum over taken j of c_j p_j
  (1[i = j] - p_i). p = .5, .3, .15, .05 with top_p 0.6 takes two of the K = 3 slots."""
  p = np.array([.5, .3, .15, .05])
  router = build_router(TopPRouter, _router_cfg(top_p=0.6), 4, 3)
  c = jnp.array([1.0, 2.0, 5.0])  # the third slot is not taken: its weight is 0
  loss = lambda l: jnp.sum(router.apply({'params': {'w': jnp.eye(4)}}, l,  # noqa: E731
                                        train=False).combine_weights[0] * c)
  g = jax.grad(loss)(jnp.log(jnp.asarray(p[None], jnp.float32)))
  want = sum(cj * p[j] * ((np.arange(4) == j) - p) for j, cj in ((0, 1.0), (1, 2.0)))
  np.testing.assert_allclose(g[0], want, rtol=1e-5, atol=1e-7)


def test_the_selection_bias_stays_on_the_real_experts_beside_null_experts():
  """null_experts = 2 without null_bias: the bias [N] is the 4 real experts' own (the null
  experts, numbered after them, take none). Bias +1 on expert 3 outweighs every score."""
  router = build_router(TopKRouter, _router_cfg(null_experts=2), 4, 1)
  logits = jnp.array([[0.3, 0.2, 0.1, 0.0, 0.25, 0.15], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
  out = router.apply({'params': {'w': jnp.eye(6)}}, logits, train=False,
                     bias=jnp.array([0.0, 0.0, 0.0, 1.0]))
  np.testing.assert_array_equal(out.expert_index, [[3], [3]])


def test_router_entropy_is_each_tokens_then_their_mean():
  """Token 0 certain (entropy 0), token 1 uniform over 3 experts (ln 3): the mean is ln 3 / 2
  (over experts first it would be 0.366 each)."""
  probs = jnp.array([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
  assert float(losses.mean_entropy(probs)) == pytest.approx(np.log(3) / 2, rel=1e-5)


def test_relu_router_gates_and_null_slots():
  # Gates relu(logits): token 0 -> experts 0 (1.0), 2 (0.5); token 1 -> none (every slot null);
  # token 2 has four positive gates, K = 2 keeps the largest two (3, 2).
  logits = [[1.0, -2.0, 0.5, 0.0], [-1, -1, -1, -1], [3, 2, 1, 0.5]]
  r = _apply_router(ReLURouter, logits, 2)
  np.testing.assert_array_equal(r.expert_index, [[0, 2], [4, 4], [0, 1]])
  np.testing.assert_allclose(r.combine_weights, [[1, .5], [0, 0], [3, 2]])
  stats = balance.active_experts(r, 4)
  np.testing.assert_allclose(stats['active_experts'], 4 / 3, rtol=1e-6)
  np.testing.assert_allclose(stats['active_experts_hist'], [1 / 3, 0, 2 / 3], rtol=1e-6)
  # The load-balanced L1: positives per expert (2, 1, 2, 1) -> f = 4 / (k 3) * those, with
  # k = 2: (4/3, 2/3, 4/3, 2/3); sum_e f_e R_te = 2, 0, 4 + 4/3 + 4/3 + 1/3 = 7 -> mean 3.
  np.testing.assert_allclose(losses.l1_penalty(r, 2.0), 3.0, rtol=1e-6)
  # Sparsity 6 / 12 zero gates. Target k = 2 of 4: sparsity 0.5, on target: unchanged; k = 1
  # (0.75 wanted, denser than that): the coefficient grows by 1.2; k = 3 (0.25): shrinks.
  for target, factor in [(2, 1.0), (1, 1.2), (3, 1 / 1.2)]:
    np.testing.assert_allclose(balance.l1_coef_update(r, 1e-3, target, 1.2), 1e-3 * factor,
                               rtol=1e-6)


def test_null_experts_route_like_experts_and_compute_nothing():
  # N = 2 real + Z = 2 null experts, K = 2 of 4. Token 0 prefers 1 then 3 (null), token 1
  # prefers 0 then 1. Renormalised weights: token 0 (.6, .2) / .8 = (.75, .25).
  logits = np.log([[.1, .6, .1, .2], [.5, .3, .1, .1]])
  r = _apply_router(TopKRouter, logits, 2, null_experts=2, null_kind='identity')
  np.testing.assert_array_equal(r.expert_index, [[1, 3], [0, 1]])
  np.testing.assert_allclose(r.combine_weights, [[.75, .25], [.625, .375]], rtol=1e-6)
  np.testing.assert_allclose(r.passthrough, [.25, 0], rtol=1e-6)  # identity: gate of slot 3
  assert r.probs.shape == (2, 4)  # the balance losses see all N + Z experts
  z = _apply_router(TopKRouter, logits, 2, null_experts=2, null_kind='zero')
  assert z.passthrough is None
  assert float(balance.active_experts(z, 2)['active_experts']) == 1.5


def test_null_slots_take_no_capacity():
  # The hand-worked case of test_dispatch with token 0's second choice null (expert 2 = N):
  # e0 <- t0, t1 (t2 dropped), e1 <- t3 first; then t1's second choice takes e1's last slot
  # (which t0's took before), t2's and t3's seconds are dropped.
  index = jnp.array([[0, 2], [0, 1], [0, 1], [1, 0]])
  slots = capacity_slots(index, num_experts=2, capacity=2, priority='choice')
  np.testing.assert_array_equal(slots, [[0, 4], [1, 3], [4, 4], [2, 4]])
  # 3 of the 7 real choices dropped; t2 lost both of its: 1 of 4 tokens has no expert.
  np.testing.assert_allclose(drop_stats(slots, 4, index, 2), [3 / 7, 1 / 4], rtol=1e-6)


def _layer(router, dispatch, **kw):
  c = tiny_config()
  moe = c.model.moe
  moe.router.name, moe.dispatch.name = router, dispatch
  moe.num_experts_per_tok = 3
  moe.dispatch.capacity_factor = 100.0  # nothing drops
  moe.dispatch.group_size = 16
  for k, v in kw.items():
    section, _, field = k.rpartition('.')
    (moe[section] if section else moe)[field] = v
  return MoEFFN(ml_collections.FrozenConfigDict(moe), c.model.d_model)


@pytest.fixture(scope='module')
def top_p_case():
  x = jax.random.normal(jax.random.key(3), (2, 24, 32))
  layer = _layer('top_p', 'dropless', **{'router.top_p': 0.45})
  params = nn.unbox(layer.init(jax.random.key(4), x))
  return x, params


def _top_p_reference(tokens, p, top_p, k):
  logits = tokens @ np.asarray(p['router']['w'], np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  index = np.argsort(-probs, axis=-1, kind='stable')[:, :k]
  best = np.take_along_axis(probs, index, -1)
  taken = np.cumsum(best, -1) - best < top_p
  return np.where(taken, index, probs.shape[1]), np.where(taken, best, 0)


@pytest.mark.parametrize('dispatch,backend', [
    ('capacity', 'auto'), ('einsum', 'auto'), ('dropless', 'blocked'),
    ('dropless', 'ragged_dot'), ('all_to_all', 'auto'), ('ring', 'blocked')])
def test_every_dispatch_path_equals_the_loop_reference_with_null_slots(top_p_case, dispatch,
                                                                       backend):
  x, params = top_p_case
  y, aux = _layer('top_p', dispatch, **{'router.top_p': 0.45, 'experts.backend': backend}
                  ).apply(params, x)
  p = params['params']
  tokens = np.asarray(x, np.float64).reshape(-1, 32)
  index, weights = _top_p_reference(tokens, p, 0.45, 3)
  counts = (index < 8).sum(-1)
  assert set(counts) == {1, 2, 3}  # tokens with 2, 1 and no null slots
  np.testing.assert_array_equal(aux['expert_index'], index)
  ref = loop_reference(tokens, index, weights, p['experts'])
  ref += _swiglu(tokens, p['shared']['wi_0'], p['shared']['wi_1'], p['shared']['wo'])
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 32), ref, rtol=1e-5, atol=1e-5)
  assert float(aux['dropped_fraction']) == 0.0
  np.testing.assert_allclose(aux['active_experts'], counts.mean(), rtol=1e-6)
  np.testing.assert_allclose(aux['active_experts_hist'], np.bincount(counts, minlength=4) / 48)


def test_identity_experts_add_the_token_itself():
  x = jax.random.normal(jax.random.key(5), (2, 8, 32))
  layer = _layer('topk', 'capacity', **{'router.null_experts': 4, 'router.null_kind': 'identity',
                                        'num_shared_experts': 0})
  params = nn.unbox(layer.init(jax.random.key(6), x))
  y, aux = layer.apply(params, x)
  p = params['params']
  tokens = np.asarray(x, np.float64).reshape(-1, 32)
  logits = tokens @ np.asarray(p['router']['w'], np.float64)  # [T, 12]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  index = np.argsort(-probs, axis=-1, kind='stable')[:, :3]
  weights = np.take_along_axis(probs, index, -1)
  weights /= weights.sum(-1, keepdims=True)
  assert (index >= 8).any() and (index < 8).any()
  ref = loop_reference(tokens, index, weights, p['experts'])  # index >= 8: nothing
  ref += np.where(index >= 8, weights, 0).sum(-1, keepdims=True) * tokens
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 32), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(aux['expert_index'], index)  # null ids kept for replay


def test_relu_router_gradients_reach_the_router_through_the_gates():
  """ReMoE's point: the output is differentiable in the gates. d y / d router weights equals
  an all-experts formulation y = sum_e relu(logit_e) expert_e(x) (no expert is cut with
  K = N slots)."""
  x = jax.random.normal(jax.random.key(7), (1, 8, 32))
  layer = _layer('relu', 'dropless', num_experts_per_tok=8, num_shared_experts=0,
                 **{'balance.l1_target': 2.0, 'balance.aux_loss_weight': 0.0})
  params = nn.unbox(layer.init(jax.random.key(8), x))

  def dense(p, x):
    t = x.reshape(-1, 32)
    gates = jax.nn.relu(t @ p['params']['router']['w'])  # [T, N]
    e = p['params']['experts']
    h = jax.nn.silu(jnp.einsum('td,edf->tef', t, e['wi_0'])) * jnp.einsum(
        'td,edf->tef', t, e['wi_1'])
    return jnp.einsum('tef,efd,te->td', h, e['wo'], gates).reshape(x.shape)

  cot = jax.random.normal(jax.random.key(9), x.shape)
  g = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x)[0] * cot)))(params)
  g_ref = jax.grad(lambda p: jnp.sum(dense(p, x) * cot))(params)
  assert float(jnp.abs(g['params']['router']['w']).max()) > 0
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bad_settings_are_refused_naming_the_field():
  def refused(field, **moe):
    c = tiny_config()
    for k, v in moe.items():
      section, _, name = k.rpartition('.')
      (c.model.moe[section] if section else c.model.moe)[name] = v
    with pytest.raises(ConfigError, match=field):
      validate(c, 1)
  refused('l1_target', **{'router.name': 'relu'})  # ReMoE needs its target
  refused('l1_target', **{'router.name': 'relu', 'balance.l1_target': 3.0})  # above K = 2
  refused('top_p', **{'router.name': 'top_p', 'router.top_p': 1.5})
  refused('null_experts', **{'router.name': 'top_p', 'router.null_experts': 2})  # not read
  refused('null_experts', **{'router.null_experts': 2, 'router.num_groups': 2,
                             'router.topk_groups': 1})
  refused('null_kind', **{'router.null_experts': 2, 'router.null_kind': 'copy'})
  refused('l1_target', **{'balance.l1_target': 2.0})  # the topk router has no L1 penalty


def _l1_coefs(state):
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(state.model_state))
  return np.concatenate([np.ravel(v) for p, v in leaves if 'l1_coef' in jax.tree_util.keystr(p)])


@pytest.mark.parametrize('router,kw', [
    pytest.param('top_p', {'router.top_p': 0.15, 'balance.entropy_loss_weight': 1e-4},
                 marks=pytest.mark.slow),  # top-p's gradient: test_top_p_weights_carry_...
    ('relu', {'balance.l1_target': 1.0, 'balance.l1_init': 1e-4}),
    ('topk', {'router.null_experts': 4, 'router.null_kind': 'identity'})])
def test_train_steps_report_active_experts(router, kw):
  """Three train steps: finite losses, the active-expert metrics, and for the ReLU router the
  L1 coefficient of every MoE layer moving by exactly one factor of l1_growth per step."""
  from conftest import trainer_on
  c = tiny_config()
  c.model.moe.router.name = router
  for k, v in kw.items():
    section, _, field = k.rpartition('.')
    c.model.moe[section][field] = v
  trainer = trainer_on(c, dict(data=1, fsdp=1, expert=1, tensor=1))
  state = trainer.init(0)
  rng = np.random.default_rng(0)
  coefs = [_l1_coefs(state)] if router == 'relu' else []
  for _ in range(3):
    tokens = rng.integers(0, 256, (8, 17)).astype(np.int32)
    state, m = trainer.train_step(state, {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]})
    m = jax.device_get(m)
    assert np.isfinite(m['train/loss'])
    hist = np.asarray(m['moe/active_experts_hist'])  # [MoE layers, K + 1]
    assert hist.shape == (2, 3)
    np.testing.assert_allclose(hist.sum(-1), 1, rtol=1e-6)
    np.testing.assert_allclose(m['moe/active_experts'], (hist * np.arange(3)).sum(-1).mean(),
                               rtol=1e-5)
    if router == 'relu':
      coefs.append(_l1_coefs(state))
      assert m['moe/l1_loss'] > 0
  if router == 'relu':
    np.testing.assert_allclose(coefs[0], 1e-4)
    for before, after in zip(coefs, coefs[1:]):
      ratio = after / before
      assert np.all(np.isclose(ratio, 1.2) | np.isclose(ratio, 1 / 1.2) | np.isclose(ratio, 1))
  else:  # some slots null: fewer than K = 2 experts per token on average
    assert m['moe/active_experts'] < 2
