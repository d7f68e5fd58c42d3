"""The 'glu' expert block (biases, clamping, sigmoid gain, up offset) through every dispatch
path against a loop-over-experts reference, its gradients against an all-experts formulation,
expert parallelism on 8 devices against 1, and a router with a learned logit bias."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from moejax.checks import validate
from moejax.errors import ConfigError
from moejax.moe.experts.glu import glu
from moejax.moe.layer import MoEFFN

from conftest import expert_block_config, tiny_config, train_side_by_side, trainer_on
from test_dispatch import TOKAMAX

# The gpt-oss settings: the clamp at 7 matters for values drawn below (scaled up 4x).
GPT_OSS = dict(alpha=1.702, up_offset=1.0, limit=7.0, bias=True)


def _config(dispatch='dropless', backend='auto', **experts):
  c = expert_block_config('glu', dispatch, backend, **{**GPT_OSS, **experts})
  c.model.moe.router.logit_bias = True
  return c


def _layer(**kw):
  c = _config(**kw)
  return MoEFFN(ml_collections.FrozenConfigDict(c.model.moe), c.model.d_model)


@pytest.fixture(scope='module')
def case():
  x = jax.random.normal(jax.random.key(3), (2, 24, 32))
  params = nn.unbox(_layer().init(jax.random.key(4), x))
  # Biases random (they start at zero) and weights large enough that the clamp bites.
  keys = iter(jax.random.split(jax.random.key(5), 8))
  p = params['params']
  for name in ('bi_0', 'bi_1', 'bo'):
    p['experts'][name] = jax.random.normal(next(keys), p['experts'][name].shape)
  for name in ('wi_0', 'wi_1'):
    p['experts'][name] = p['experts'][name] * 4
  p['router']['b'] = jax.random.normal(next(keys), p['router']['b'].shape)
  return x, params


def _np_glu(gate, up, alpha, up_offset, limit):
  if limit:
    gate, up = np.minimum(gate, limit), np.clip(up, -limit, limit)
  return gate / (1 + np.exp(-alpha * gate)) * (up + up_offset)


def _reference(tokens, p, k=2, alpha=1.702, up_offset=1.0, limit=7.0):
  """Top-k of the biased logits, softmax over the chosen ones; each expert on its tokens."""
  logits = tokens @ np.asarray(p['router']['w'], np.float64) + np.asarray(p['router']['b'])
  index = np.argsort(-logits, axis=-1, kind='stable')[:, :k]
  chosen = np.take_along_axis(logits, index, -1)
  weights = np.exp(chosen - chosen.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  e_ = {n: np.asarray(v, np.float64) for n, v in p['experts'].items()}
  y = np.zeros_like(tokens)
  for e in range(e_['wi_0'].shape[0]):
    for t, j in zip(*np.nonzero(index == e)):
      gate = tokens[t] @ e_['wi_0'][e] + e_['bi_0'][e]
      up = tokens[t] @ e_['wi_1'][e] + e_['bi_1'][e]
      h = _np_glu(gate, up, alpha, up_offset, limit)
      y[t] += weights[t, j] * (h @ e_['wo'][e] + e_['bo'][e])
  return y


@pytest.mark.parametrize('dispatch,backend', [
    ('capacity', 'auto'), ('einsum', 'auto'), ('dropless', 'blocked'),
    ('dropless', 'ragged_dot'), ('all_to_all', 'auto'), ('ring', 'blocked'),
    pytest.param('dropless', 'tokamax', marks=TOKAMAX)])
def test_every_dispatch_path_runs_the_glu_block(case, dispatch, backend):
  x, params = case
  assert set(params['params']['experts']) == {'wi_0', 'wi_1', 'wo', 'bi_0', 'bi_1', 'bo'}
  y, _ = _layer(dispatch=dispatch, backend=backend).apply(params, x)
  tokens = np.asarray(x, np.float64).reshape(-1, 32)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 32), _reference(tokens, params['params']),
                             rtol=2e-5, atol=2e-5)


def test_the_clamp_bites_in_this_case(case):
  """Without the clamp the reference differs: the case exercises it (both sides of up)."""
  x, params = case
  tokens = np.asarray(x, np.float64).reshape(-1, 32)
  p = params['params']['experts']
  up = tokens @ np.asarray(p['wi_1'][0]) + np.asarray(p['bi_1'][0])
  gate = tokens @ np.asarray(p['wi_0'][0]) + np.asarray(p['bi_0'][0])
  assert (up > 7).any() and (up < -7).any() and (gate > 7).any() and (gate < -7).any()
  assert not np.allclose(_reference(tokens, params['params']),
                         _reference(tokens, params['params'], limit=0.0), atol=1e-3)


def test_glu_activation_by_hand():
  """gate 8 (clamped to 7 from above), -9 (kept: the gate has no lower clamp); up 9 -> 7,
  -8 -> -7; alpha 1, offset 0, no clamp is silu(gate) * up."""
  gate, up = jnp.array([8.0, -9.0, 0.5]), jnp.array([9.0, -8.0, 2.0])
  got = np.asarray(glu(gate, up, 1.702, 1.0, 7.0))
  s = lambda v: 1 / (1 + np.exp(-v))
  want = [7 * s(1.702 * 7) * 8, -9 * s(1.702 * -9) * -6, 0.5 * s(1.702 * 0.5) * 3]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(glu(gate, up, 1.0, 0.0, 0.0), jax.nn.silu(gate) * up, rtol=1e-6)


@pytest.mark.parametrize('backend', ['blocked', 'ragged_dot'])
def test_glu_gradients_match_an_all_experts_formulation(case, backend):
  x, params = case
  layer = _layer(backend=backend)

  def dense(p, x):
    p = p['params']
    t = x.reshape(-1, 32)
    logits = t @ p['router']['w'] + p['router']['b']
    top, idx = jax.lax.top_k(logits, 2)
    gate_w = jnp.zeros_like(logits).at[jnp.arange(t.shape[0])[:, None], idx].set(
        jax.nn.softmax(top, axis=-1))
    e = p['experts']
    g = jnp.einsum('td,edf->tef', t, e['wi_0']) + e['bi_0']
    u = jnp.einsum('td,edf->tef', t, e['wi_1']) + e['bi_1']
    out = jnp.einsum('tef,efd->ted', glu(g, u, 1.702, 1.0, 7.0), e['wo']) + e['bo']
    return jnp.einsum('ted,te->td', out, gate_w).reshape(x.shape)

  cot = jax.random.normal(jax.random.key(6), x.shape)
  g = jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply(p, x)[0] * cot), argnums=(0, 1)))(params, x)
  g_ref = jax.grad(lambda p, x: jnp.sum(dense(p, x) * cot), argnums=(0, 1))(params, x)
  assert jax.tree.structure(g) == jax.tree.structure(g_ref)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize('backend', ['blocked', 'ragged_dot'])
def test_rows_past_the_groups_get_nothing_from_the_local_biases(case, backend):
  """Under expert parallelism a device's sorted rows end with rows routed elsewhere (past the
  sum of its group sizes): they must come back 0, with no local expert's bias in them; the rows
  in the groups are their expert by hand."""
  from moejax.moe.experts.glu import GLUShard
  _, params = case
  e = params['params']['experts']
  local = tuple(jnp.asarray(e[n])[2:4]
                for n in ('wi_0', 'wi_1', 'wo', 'bi_0', 'bi_1', 'bo'))  # experts 2, 3 here
  shard = GLUShard(local, 1.702, 1.0, 7.0, backend, 4)
  rows = np.asarray(jax.random.normal(jax.random.key(6), (9, 32)))
  y = np.asarray(shard.grouped(jnp.asarray(rows), jnp.array([2, 3], jnp.int32)))
  assert (y[5:] == 0).all()  # 4 rows past the 5 in groups
  for r, expert in enumerate([0, 0, 1, 1, 1]):
    wi_0, wi_1, wo, bi_0, bi_1, bo = (np.asarray(w[expert], np.float64) for w in local)
    want = _np_glu(rows[r] @ wi_0 + bi_0, rows[r] @ wi_1 + bi_1, 1.702, 1.0, 7.0) @ wo + bo
    np.testing.assert_allclose(y[r], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_ring_of_glu_experts_on_8_devices_equals_dropless_on_1():
  """Expert parallelism splits the biases with their experts."""
  train_side_by_side(trainer_on(_config(), dict(data=1, fsdp=1, expert=1, tensor=1)),
                     trainer_on(_config(dispatch='ring'), dict(data=2, fsdp=1, expert=4,
                                                               tensor=1)),
                     ('train/loss', 'train/grad_norm'))


def test_glu_settings_are_checked():
  with pytest.raises(ConfigError, match=r"experts.limit=-1.0: must be >= 0"):
    validate(_config(limit=-1.0), 1)
  c = tiny_config()
  c.model.moe.experts.limit = 7.0  # the SwiGLU block has no clamp
  with pytest.raises(ConfigError, match=r"experts.limit=7.0: is not read by .*\(glu\)"):
    validate(c, 1)
