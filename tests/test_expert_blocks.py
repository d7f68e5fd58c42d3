"""The expert-block contract with a second block: 'mlp' (two matrices, no gate) runs through
every dispatch path, expert parallelism included, against a loop-over-experts reference."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from moejax.checks import validate
from moejax.errors import ConfigError
from moejax.moe.layer import MoEFFN

from conftest import expert_block_config, tiny_config, train_side_by_side, trainer_on
from test_dispatch import TOKAMAX, _numpy_router

_erf = np.vectorize(math.erf)
ACT = {'relu': lambda a: np.maximum(a, 0), 'gelu': lambda a: 0.5 * a * (1 + _erf(a / 2 ** 0.5))}


def _config(dispatch='dropless', activation='relu', backend='auto'):
  return expert_block_config('mlp', dispatch, backend, activation=activation)


def _layer(**kw):
  c = _config(**kw)
  return MoEFFN(ml_collections.FrozenConfigDict(c.model.moe), c.model.d_model)


@pytest.fixture(scope='module')
def case():
  x = jax.random.normal(jax.random.key(3), (2, 24, 32))
  return x, nn.unbox(_layer().init(jax.random.key(4), x))


def _reference(tokens, p, activation):
  """y[t] = sum_k w[t, k] act(x[t] W_in[e]) W_out[e], one expert at a time."""
  index, weights = _numpy_router(tokens, p['router']['w'], 2, True)
  wi, wo = (np.asarray(p['experts'][k], np.float64) for k in ('wi', 'wo'))
  y = np.zeros_like(tokens)
  for e in range(wi.shape[0]):
    for t, k in zip(*np.nonzero(index == e)):
      y[t] += weights[t, k] * ACT[activation](tokens[t] @ wi[e]) @ wo[e]
  return y


@pytest.mark.accelerator
@pytest.mark.parametrize('dispatch,backend,activation', [
    ('capacity', 'auto', 'relu'), ('einsum', 'auto', 'relu'), ('dropless', 'blocked', 'relu'),
    ('dropless', 'ragged_dot', 'relu'), ('all_to_all', 'auto', 'relu'),
    ('ring', 'blocked', 'relu'), ('dropless', 'blocked', 'gelu'),
    pytest.param('dropless', 'tokamax', 'relu', marks=TOKAMAX)])
def test_every_dispatch_path_runs_the_mlp_block(case, dispatch, backend, activation):
  x, params = case
  assert set(params['params']['experts']) == {'wi', 'wo'}
  y, _ = _layer(dispatch=dispatch, backend=backend, activation=activation).apply(params, x)
  tokens = np.asarray(x, np.float64).reshape(-1, 32)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 32),
                             _reference(tokens, params['params'], activation),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.accelerator
@pytest.mark.parametrize('backend', ['blocked', 'ragged_dot',
                                     pytest.param('tokamax', marks=TOKAMAX)])
def test_mlp_gradients_match_an_all_experts_formulation(case, backend):
  x, params = case
  layer = _layer(backend=backend)

  def dense(p, x):
    p = p['params']
    t = x.reshape(-1, 32)
    probs = jax.nn.softmax(t @ p['router']['w'])
    w, idx = jax.lax.top_k(probs, 2)
    gate = jnp.zeros_like(probs).at[jnp.arange(t.shape[0])[:, None], idx].set(
        w / w.sum(-1, keepdims=True))
    h = jax.nn.relu(jnp.einsum('td,edf->tef', t, p['experts']['wi']))
    return jnp.einsum('tef,efd,te->td', h, p['experts']['wo'], gate).reshape(x.shape)

  cot = jax.random.normal(jax.random.key(5), x.shape)
  g = jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply(p, x)[0] * cot), argnums=(0, 1)))(params, x)
  g_ref = jax.grad(lambda p, x: jnp.sum(dense(p, x) * cot), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # the ring itself: test_ring.py; GLU experts on it: test_glu_experts.py
def test_ring_of_mlp_experts_on_8_devices_equals_dropless_on_1():
  """The expert-parallel paths split however many weights the block has (two here)."""
  one = _config()
  ring = _config(dispatch='ring')
  train_side_by_side(trainer_on(one, dict(data=1, fsdp=1, expert=1, tensor=1)),
                     trainer_on(ring, dict(data=2, fsdp=1, expert=4, tensor=1)),
                     ('train/loss', 'train/grad_norm'))


def test_block_settings_are_the_blocks_own():
  c = tiny_config()
  c.model.moe.experts.activation = 'relu'  # the SwiGLU block has no activation setting
  with pytest.raises(ConfigError, match=r"experts.activation='relu': is not read by .*'swiglu' "
                                        r'expert block.*choose an expert block that reads it '
                                        r'\(mlp\)'):
    validate(c, 1)
  c = _config(activation='tanh')
  with pytest.raises(ConfigError, match="experts.activation='tanh': must be one of"):
    validate(c, 1)
