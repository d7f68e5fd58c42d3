"""Dispatch paths against a slow loop-over-experts reference and hand-worked drop cases."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from moejax import kernels
from moejax.moe.dispatch.capacity import CapacityDispatch, capacity_slots, expert_capacity
from moejax.moe.dispatch.einsum import EinsumDispatch
from moejax.moe.experts.swiglu import SwiGLUExperts
from moejax.moe.layer import MoEFFN
from moejax.moe.types import RouterOutput

from conftest import tiny_config

# Hand-worked case: 4 tokens, 2 experts, top-2, capacity 2 (N*C = 4 is the "dropped" slot).
INDEX = jnp.array([[0, 1], [0, 1], [0, 1], [1, 0]])


def test_capacity_formula():
  assert expert_capacity(num_tokens=4, k=2, num_experts=2, factor=0.5, min_capacity=1) == 2
  assert expert_capacity(64, 2, 8, 1.25, 4) == 20  # ceil(1.25 * 2 * 64 / 8)
  assert expert_capacity(64, 2, 8, 0.01, 4) == 4  # min_capacity
  assert expert_capacity(8, 2, 2, 4.0, 4) == 8  # never more than the tokens


def test_choice_priority_serves_first_choices_first():
  # First choices in token order: e0 <- t0, t1, (t2 dropped); e1 <- t3. Then second choices:
  # e1 <- t0, (t1, t2 dropped); e0 full, t3's second dropped.
  slots = capacity_slots(INDEX, num_experts=2, capacity=2, priority='choice')
  np.testing.assert_array_equal(slots, [[0, 3], [1, 4], [4, 4], [2, 4]])


def test_position_priority_serves_tokens_in_order():
  # e0 <- t0, t1 (t2, t3 dropped); e1 <- t0, t1 (t2, t3 dropped).
  slots = capacity_slots(INDEX, num_experts=2, capacity=2, priority='position')
  np.testing.assert_array_equal(slots, [[0, 2], [1, 3], [4, 4], [4, 4]])


def test_probability_priority_serves_highest_weights_first():
  # Pairs served by weight: t2/e0 .9, t3/e1 .8, t1/e0 .7, t0/e0 .6 (e0 full: dropped),
  # t0/e1 .4, then t1/e1 .3, t3/e0 .2, t2/e1 .1 all dropped (both experts full).
  weights = jnp.array([[.6, .4], [.7, .3], [.9, .1], [.8, .2]])
  slots = capacity_slots(INDEX, num_experts=2, capacity=2, priority='probability',
                         weights=weights)
  np.testing.assert_array_equal(slots, [[4, 3], [1, 4], [0, 4], [2, 4]])


def _swiglu(x, w0, w1, wo):
  a, c = x @ w0, x @ w1
  return (a / (1 + np.exp(-a)) * c) @ wo


def loop_reference(x, index, weights, experts, keep=None):
  """y[t] = sum over kept (t, k) of w[t, k] * expert_{index[t, k]}(x[t]), one expert at a time."""
  x, index, weights = (np.asarray(a, np.float64) for a in (x, index, weights))
  w0, w1, wo = (np.asarray(experts[n], np.float64) for n in ('wi_0', 'wi_1', 'wo'))
  keep = np.ones(index.shape, bool) if keep is None else np.asarray(keep)
  y = np.zeros_like(x)
  for e in range(w0.shape[0]):
    for t in range(x.shape[0]):
      for k in range(index.shape[1]):
        if index[t, k] == e and keep[t, k]:
          y[t] += weights[t, k] * _swiglu(x[t], w0[e], w1[e], wo[e])
  return y


def _experts(n, d=8, f=4, **kw):
  mod = SwiGLUExperts(num_experts=n, d_model=d, d_ff=f, **kw)
  params = nn.unbox(mod.init(jax.random.key(1), jnp.zeros((n, 1, d)), method='capacity'))
  return mod, params


def test_capacity_output_drops_exactly_the_hand_worked_choices():
  mod, params = _experts(2)
  x = jax.random.normal(jax.random.key(2), (4, 8))
  w = jnp.array([[.6, .4], [.7, .3], [.5, .5], [.9, .1]])
  r = RouterOutput(INDEX, w, jnp.zeros((4, 2)), jnp.zeros((4, 2)))
  dispatch = CapacityDispatch(capacity_factor=0.5, min_capacity=1, priority='choice')
  y, stats = mod.apply(params, x, r, mod, True, method=lambda m, *a: dispatch(*a[:2], m, a[3]))
  keep = [[1, 1], [1, 0], [0, 0], [1, 0]]
  np.testing.assert_allclose(y, loop_reference(x, INDEX, w, params['params'], keep), rtol=1e-5,
                             atol=1e-6)
  assert float(stats['dropped_fraction']) == 0.5
  assert np.all(np.asarray(y[2]) == 0)  # token 2 lost both choices: only the residual carries it


@pytest.mark.parametrize('group_size,keep', [
    (4, [[1, 1], [1, 0], [0, 0], [1, 0]]),  # one group: the same drops as the indexed path
    # Two groups of 2, capacity ceil(0.5 * 2 * 2 / 2) = 1 each. Group {t0, t1}: e0 <- t0 (t1's
    # first choice dropped), e1 <- t0 (t1's second dropped). Group {t2, t3}: e0 <- t2,
    # e1 <- t3; both second choices find their expert full.
    (2, [[1, 1], [0, 0], [1, 0], [1, 0]]),
])
def test_einsum_output_drops_exactly_the_hand_worked_choices(group_size, keep):
  mod, params = _experts(2)
  x = jax.random.normal(jax.random.key(2), (4, 8))
  w = jnp.array([[.6, .4], [.7, .3], [.5, .5], [.9, .1]])
  r = RouterOutput(INDEX, w, jnp.zeros((4, 2)), jnp.zeros((4, 2)))
  dispatch = EinsumDispatch(group_size=group_size, capacity_factor=0.5, min_capacity=1)
  y, stats = mod.apply(params, x, r, mod, True, method=lambda m, *a: dispatch(*a[:2], m, a[3]))
  np.testing.assert_allclose(y, loop_reference(x, INDEX, w, params['params'], keep), rtol=1e-5,
                             atol=1e-6)
  assert float(stats['dropped_fraction']) == 1 - np.mean(keep)


def _layer(dispatch, backend='auto'):
  c = tiny_config()
  c.model.moe.dispatch.name = dispatch
  c.model.moe.experts.backend = backend
  c.model.moe.dispatch.capacity_factor = 100.0  # large enough that nothing drops
  c.model.moe.dispatch.group_size = 16  # einsum: the 48 tokens of layer_case in 3 groups
  c.model.moe.num_shared_experts = 1
  return MoEFFN(ml_collections.FrozenConfigDict(c.model.moe), c.model.d_model)


TOKAMAX = pytest.mark.skipif(not kernels.available('tokamax'),
                             reason="the tokamax backend needs the kernels extra (pip install "
                             "'moejax[kernels]')")
PATHS = [('capacity', 'auto'), ('einsum', 'auto'), ('dropless', 'blocked'),
         ('dropless', 'ragged_dot'), pytest.param('dropless', 'tokamax', marks=TOKAMAX)]


@pytest.fixture(scope='module')
def layer_case():
  x = jax.random.normal(jax.random.key(3), (2, 24, 32))
  params = nn.unbox(_layer('dropless').init(jax.random.key(4), x))
  return x, params


def _numpy_router(x, w, k, norm):
  logits = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  index = np.argsort(-p, axis=-1, kind='stable')[:, :k]
  weights = np.take_along_axis(p, index, -1)
  if norm:
    weights = weights / weights.sum(-1, keepdims=True)
  return index, weights


@pytest.mark.accelerator
@pytest.mark.parametrize('dispatch,backend', PATHS)
def test_moe_layer_matches_loop_reference(layer_case, dispatch, backend):
  x, params = layer_case
  y, aux = _layer(dispatch, backend).apply(params, x)
  p = params['params']
  tokens = np.asarray(x).reshape(-1, 32)
  index, weights = _numpy_router(tokens, p['router']['w'], 2, True)
  ref = loop_reference(tokens, index, weights, p['experts'])
  ref += _swiglu(tokens, p['shared']['wi_0'], p['shared']['wi_1'], p['shared']['wo'])
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 32), ref, rtol=1e-5, atol=1e-5)
  assert float(aux['dropped_fraction']) == 0.0


def _dense_reference(params, x):
  """Every expert on every token, masked by the routing: an independent JAX formulation."""
  p = params['params']
  t = x.reshape(-1, x.shape[-1])
  probs = jax.nn.softmax(t @ p['router']['w'])
  w, idx = jax.lax.top_k(probs, 2)
  w = w / w.sum(-1, keepdims=True)
  gate = jnp.zeros_like(probs).at[jnp.arange(t.shape[0])[:, None], idx].set(w)  # [T, N]
  e = p['experts']
  h = jax.nn.silu(jnp.einsum('td,edf->tef', t, e['wi_0'])) * jnp.einsum('td,edf->tef', t,
                                                                          e['wi_1'])
  y = jnp.einsum('tef,efd,te->td', h, e['wo'], gate)
  s = p['shared']
  y = y + (jax.nn.silu(t @ s['wi_0']) * (t @ s['wi_1'])) @ s['wo']
  return y.reshape(x.shape)


@pytest.mark.accelerator
@pytest.mark.parametrize('dispatch,backend', PATHS)
def test_moe_layer_gradients_match_dense_reference(layer_case, dispatch, backend):
  x, params = layer_case
  cot = jax.random.normal(jax.random.key(5), x.shape)
  layer = _layer(dispatch, backend)
  g = jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply(p, x)[0] * cot), argnums=(0, 1)))(params, x)
  g_ref = jax.grad(lambda p, x: jnp.sum(_dense_reference(p, x) * cot), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_capacity_with_large_capacity_equals_dropless(layer_case):
  x, params = layer_case
  y_cap, _ = _layer('capacity').apply(params, x)
  y_drop, _ = _layer('dropless', 'blocked').apply(params, x)
  np.testing.assert_allclose(y_cap, y_drop, rtol=1e-5, atol=1e-6)


def test_capacity_drops_under_small_factor(layer_case):
  x, params = layer_case
  c = tiny_config()
  c.model.moe.dispatch.name, c.model.moe.dispatch.capacity_factor = 'capacity', 0.5
  c.model.moe.dispatch.min_capacity = 1
  layer = MoEFFN(ml_collections.FrozenConfigDict(c.model.moe), 32)
  _, aux = layer.apply(params, x, train=True)
  assert 0.4 <= float(aux['dropped_fraction']) < 1.0  # at least half the choices cannot fit


@TOKAMAX
def test_the_tokamax_backend_runs_tokamax(layer_case, monkeypatch):
  """experts.backend='tokamax' goes through tokamax.ragged_dot (the same numbers as XLA's
  ragged_dot on CPU, so only a spy can tell)."""
  import tokamax
  calls = []
  real = tokamax.ragged_dot

  def spy(*args, **kwargs):
    calls.append(args[0].shape)
    return real(*args, **kwargs)
  monkeypatch.setattr(tokamax, 'ragged_dot', spy)
  x, params = layer_case
  _layer('dropless', 'tokamax').apply(params, x)
  assert len(calls) == 3  # wi_0, wi_1 and wo of the SwiGLU experts
  calls.clear()
  _layer('dropless', 'ragged_dot').apply(params, x)
  assert not calls

