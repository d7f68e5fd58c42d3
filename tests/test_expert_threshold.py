"""Expert-threshold routing (moe/routers/expert_threshold.py): the threshold update and the
routing by hand, gradients against an all-experts formulation, every dispatch path with its
null slots, decoding equal to the full forward pass, causality, and training that brings the
experts per token to the target."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from moejax.checks import validate
from moejax.errors import ConfigError
from moejax.generate import decode, decoding_model, empty_cache
from moejax.model.schedule import routing_is_causal
from moejax.model.transformer import Transformer
from moejax.moe.layer import MoEFFN
from moejax.moe.routers.expert_threshold import (ExpertThresholdRouter, ema_step,
                                                 threshold_quantiles)

from conftest import build_router, tiny_config, trainer_on
from test_dispatch import _swiglu, loop_reference

ET = {'router.name': 'expert_threshold', 'router.threshold_target': 2.0,
      'num_experts_per_tok': 4}


def _config(**moe):
  c = tiny_config()
  for key, value in {**ET, **moe}.items():
    section, _, field = key.rpartition('.')
    (c.model.moe[section] if section else c.model.moe)[field] = value
  return c


def test_threshold_quantile_and_ema_by_hand():
  # 5 tokens, 2 experts, target 1 expert per token: each expert's threshold is the median
  # (the 1 - 1/2 quantile) of its scores.
  probs = jnp.array([[.9, .1], [.6, .4], [.3, .7], [.2, .8], [.55, .45]])
  np.testing.assert_allclose(threshold_quantiles(probs, 1.0), [.55, .45], rtol=1e-6)
  # target 0.5 of 2 experts: the 0.75 quantile; linear between the 4th and 5th of 5 sorted
  # values: expert 0 sorted .2 .3 .55 .6 .9 -> position 3.0 -> .6; expert 1 -> .7.
  np.testing.assert_allclose(threshold_quantiles(probs, 0.5), [.6, .7], rtol=1e-6)
  # Bias-corrected EMA, decay 0.5: step 1 takes q1 itself; step 2 weighs q2 by
  # (1 - .5) / (1 - .25) = 2/3.
  tau, steps = ema_step(jnp.zeros(2), jnp.zeros(()), jnp.array([.4, .2]), 0.5)
  np.testing.assert_allclose(tau, [.4, .2], rtol=1e-6)
  tau, steps = ema_step(tau, steps, jnp.array([.1, .8]), 0.5)
  np.testing.assert_allclose(tau, [.4 / 3 + .2 / 3, .2 / 3 + 1.6 / 3], rtol=1e-6)
  assert float(steps) == 2.0
  # Decay 0: the thresholds are the last batch's quantiles.
  tau, _ = ema_step(jnp.array([9., 9.]), jnp.array(5.0), jnp.array([.1, .2]), 0.0)
  np.testing.assert_allclose(tau, [.1, .2], rtol=1e-6)


def test_routing_by_hand():
  """Identity router (logits = x), 3 experts, 2 slots. Token 0: p = softmax(2, 1, 0) =
  (.665, .245, .090) against tau (.3, .2, .05): experts 0 (margin .365), 2 (.040) and 1 (.045)
  pass; the two largest margins, 0 then 1, take the slots. Token 1: p = (1/3, 1/3, 1/3): only
  experts 1 and 2 pass (tau .3 < 1/3 too: all three pass; margins .033, .133, .283 -> 2, 1).
  Token 2: p = softmax(0, 0, 5): only expert 2 passes; its second slot is null."""
  moe = _config().model.moe
  router = build_router(ExpertThresholdRouter, moe.router, 3, 2)
  x = jnp.array([[2., 1., 0.], [0., 0., 0.], [0., 0., 5.]])
  tau = jnp.array([.3, .2, .05])
  r = router.apply({'params': {'w': jnp.eye(3)}}, x, train=True,
                   state={'threshold': tau, 'threshold_steps': jnp.array(1.0)})
  np.testing.assert_array_equal(r.expert_index, [[0, 1], [2, 1], [2, 3]])
  p = jax.nn.softmax(x)
  np.testing.assert_allclose(r.combine_weights, [[p[0, 0], p[0, 1]], [1 / 3, 1 / 3],
                                                 [p[2, 2], 0.0]], rtol=1e-6)
  # The threshold is strict: a score equal to its threshold does not pass.
  r = router.apply({'params': {'w': jnp.eye(3)}}, x[1:2], train=True,
                   state={'threshold': jnp.full(3, 1 / 3, jnp.float32),
                          'threshold_steps': jnp.array(1.0)})
  np.testing.assert_array_equal(r.expert_index, [[3, 3]])


def test_the_layer_returns_the_threshold_update_and_the_step_applies_it():
  c = _config()
  layer = MoEFFN(ml_collections.FrozenConfigDict(c.model.moe), c.model.d_model)
  x = jax.random.normal(jax.random.key(0), (2, 16, c.model.d_model))
  v = nn.unbox(layer.init(jax.random.key(1), x))
  v = {**v, 'moe_state': {'threshold': jnp.full(8, 0.1), 'threshold_steps': jnp.array(3.0)}}
  (_, aux), upd = layer.apply(v, x, train=True, mutable=['bias_updates'])
  logits = x.reshape(-1, c.model.d_model) @ v['params']['router']['w']
  q = np.quantile(np.asarray(jax.nn.softmax(logits)), 1 - 2 / 8, axis=0)
  w = (1 - .99) / (1 - .99 ** 4)
  np.testing.assert_allclose(upd['bias_updates']['threshold'], w * (q - 0.1), rtol=1e-5)
  assert float(upd['bias_updates']['threshold_steps']) == 1.0
  _, none = layer.apply(v, x, train=False, mutable=['bias_updates'])
  assert not none  # evaluation leaves the thresholds alone


def test_gradients_reach_the_router_through_the_gates():
  """d output / d router weights equals an all-experts formulation with the same (fixed)
  choices: y = sum_e 1[e chosen] p_e expert_e(x)."""
  c = _config(num_shared_experts=0)
  layer = MoEFFN(ml_collections.FrozenConfigDict(c.model.moe), 32)
  x = jax.random.normal(jax.random.key(2), (1, 12, 32))
  params = nn.unbox(layer.init(jax.random.key(3), x))
  params['moe_state'] = {'threshold': jnp.full(8, 0.11), 'threshold_steps': jnp.array(5.0)}
  _, aux = layer.apply(params, x)
  chosen = jax.nn.one_hot(aux['expert_index'], 9)[..., :8].sum(1)  # [T, N]
  assert float(chosen.sum(-1).min()) < float(chosen.sum(-1).max())  # thresholds that bite

  def dense(p, x):
    t = x.reshape(-1, 32)
    gates = jax.nn.softmax(t @ p['params']['router']['w']) * chosen
    e = p['params']['experts']
    h = jax.nn.silu(jnp.einsum('td,edf->tef', t, e['wi_0'])) * jnp.einsum(
        'td,edf->tef', t, e['wi_1'])
    return jnp.einsum('tef,efd,te->td', h, e['wo'], gates).reshape(x.shape)

  cot = jax.random.normal(jax.random.key(4), x.shape)
  g = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x)[0] * cot)))(params)['params']
  g_ref = jax.grad(lambda p: jnp.sum(dense(p, x) * cot))(params)['params']
  assert float(jnp.abs(g['router']['w']).max()) > 1e-4
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope='module')
def case():
  x = jax.random.normal(jax.random.key(5), (2, 24, 32))
  c = _config()
  layer = MoEFFN(ml_collections.FrozenConfigDict(c.model.moe), 32)
  params = nn.unbox(layer.init(jax.random.key(6), x))
  params['moe_state'] = {'threshold': jnp.linspace(0.08, 0.16, 8),
                         'threshold_steps': jnp.array(2.0)}
  return x, params


@pytest.mark.accelerator
@pytest.mark.parametrize('dispatch,backend', [
    ('capacity', 'auto'), ('einsum', 'auto'), ('dropless', 'blocked'),
    ('dropless', 'ragged_dot'), ('all_to_all', 'auto'), ('ring', 'blocked')])
def test_every_dispatch_path_equals_the_loop_reference(case, dispatch, backend):
  x, params = case
  extra = {'dispatch.capacity_factor': 100.0} if dispatch in ('capacity', 'einsum',
                                                              'all_to_all') else {}
  if dispatch == 'einsum':
    extra['dispatch.group_size'] = 16
  c = _config(**{'dispatch.name': dispatch, 'experts.backend': backend, **extra})
  y, aux = MoEFFN(ml_collections.FrozenConfigDict(c.model.moe), 32).apply(params, x)
  p = params['params']
  tokens = np.asarray(x, np.float64).reshape(-1, 32)
  logits = tokens @ np.asarray(p['router']['w'], np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  margin = probs - np.asarray(params['moe_state']['threshold'], np.float64)
  order = np.argsort(-margin, axis=-1, kind='stable')[:, :4]
  passed = np.take_along_axis(margin, order, -1) > 0
  index = np.where(passed, order, 8)
  weights = np.where(passed, np.take_along_axis(probs, order, -1), 0)
  counts = passed.sum(-1)
  assert len(set(counts)) >= 3  # a variable number of experts per token
  np.testing.assert_array_equal(aux['expert_index'], index)
  ref = loop_reference(tokens, index, weights, p['experts'])
  ref += _swiglu(tokens, p['shared']['wi_0'], p['shared']['wi_1'], p['shared']['wo'])
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 32), ref, rtol=1e-5, atol=1e-5)
  assert float(aux['dropped_fraction']) == 0.0
  np.testing.assert_allclose(aux['active_experts'], counts.mean(), rtol=1e-6)


def test_causal_in_training_and_decoding_equals_the_full_forward_pass():
  c = _config()
  assert routing_is_causal(c.model, train=True) and routing_is_causal(c.model, train=False)
  m = c.model
  tokens = jax.random.randint(jax.random.key(7), (2, 10), 0, 256)
  model = Transformer(ml_collections.FrozenConfigDict(m), train=False)
  variables = jax.jit(model.init)(jax.random.key(8), tokens)
  layers = variables['moe_state']['moe_layers']['moe_block']['moe']
  variables['moe_state']['moe_layers']['moe_block']['moe'] = {
      **layers, 'threshold': jax.random.uniform(jax.random.key(9), layers['threshold'].shape,
                                                minval=0.05, maxval=0.2)}
  full, aux = jax.jit(model.apply)(variables, tokens)
  active = (aux['expert_index'] < 8).sum(-1)
  assert int(active.min()) < int(active.max())  # thresholds that bite
  # Training routing of token t does not move when later tokens change.
  train_model = Transformer(ml_collections.FrozenConfigDict(m), train=True)
  later = tokens.at[:, 6:].set((tokens[:, 6:] + 17) % 256)
  train_apply = jax.jit(lambda v, t: train_model.apply(v, t, rngs={'router': jax.random.key(0)}))
  a, _ = train_apply(variables, tokens)
  b, _ = train_apply(variables, later)
  np.testing.assert_allclose(a[:, :6], b[:, :6], rtol=1e-5, atol=1e-5)
  # One token at a time through the cache gives the full pass's logits.
  dec = decoding_model(m, cache_len=10)
  cache = empty_cache(dec, 2)
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  logits, cache = decode(dec, variables, cache, tokens[:, :3], pos[:, :3])
  steps = [logits]
  for i in range(3, 10):
    logits, cache = decode(dec, variables, cache, tokens[:, i:i + 1], pos[:, i:i + 1])
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # a training run
def test_training_brings_the_experts_per_token_to_the_target():
  """From tau = 0 (every token takes all 4 slots), the train step's threshold updates bring the
  routed experts per token to about the target of 2, with no balance loss."""
  c = _config(**{'balance.aux_loss_weight': 0.0})
  trainer = trainer_on(c, {'data': 1})
  state = trainer.init(0)
  rng = np.random.default_rng(0)
  active = []
  for _ in range(12):
    tokens = rng.integers(0, 256, (8, 17)).astype(np.int32)
    state, m = trainer.train_step(state, {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]})
    active.append(float(m['moe/active_experts']))
  assert active[0] == 4.0
  assert 1.5 < np.mean(active[-4:]) < 2.5, active
  tau = state.model_state['moe_state']['moe_layers']['moe_block']['moe']['threshold']
  assert float(tau.min()) > 0


@pytest.mark.parametrize('fields,match', [
    ({'router.threshold_target': 5.0}, 'threshold_target=5.0: the average experts per token'),
    ({'router.threshold_target': 0.0}, 'threshold_target=0.0'),
    ({'router.threshold_decay': 1.0}, r'threshold_decay=1.0: must be in \[0, 1\)'),
    ({'router.name': 'topk', 'router.threshold_target': 2.0},
     "threshold_target=2.0: is not read by the 'topk' router"),
])
def test_bad_settings_are_refused_naming_the_field(fields, match):
  c = _config(**fields)
  if fields.get('router.name') == 'topk':
    c.model.moe.num_experts_per_tok = 2
    c.model.moe.router.threshold_target = 3.0
    match = match.replace('2.0', '3.0')
  with pytest.raises(ConfigError, match=match):
    validate(c, 1)
