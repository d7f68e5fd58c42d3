"""Expert choice routing: hand-worked selection, exactly C tokens per expert, the layer against
a loop reference, and the leakage that makes it non-causal."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from moejax.config import base_config
from moejax.model.schedule import routing_is_causal
from moejax.moe.layer import MoEFFN
from moejax.moe.routers.expert_choice import ExpertChoiceRouter

from test_dispatch import loop_reference

from conftest import build_router


def _router(n, **router):
  moe = base_config().model.moe
  moe.router.name = 'expert_choice'
  for k, v in router.items():
    moe.router[k] = v
  return build_router(ExpertChoiceRouter, moe.router, n, 2)


def test_hand_worked_selection():
  # Identity router: logits = x. S = softmax rows:
  #   t0 [2, 0] -> (.881, .119); t1 [1, 0] -> (.731, .269); t2 [0, 0] -> (.5, .5);
  #   t3 [0, 3] -> (.047, .953).  c = 1, N = 2, T = 4 -> C = 2.
  # Expert 0 takes t0, t1; expert 1 takes t3, t2. Token 2 gets one expert, none gets zero.
  x = jnp.array([[2., 0.], [1., 0.], [0., 0.], [0., 3.]])
  r = _router(2, ec_capacity_factor=1.0).apply({'params': {'w': jnp.eye(2)}}, x, train=True)
  ec = r.expert_choice
  np.testing.assert_array_equal(ec.token_index, [[0, 1], [3, 2]])
  np.testing.assert_allclose(ec.weights, [[.880797, .731059], [.952574, .5]], atol=1e-6)


@pytest.mark.parametrize('scope,batch', [('batch', 1), ('sequence', 4)])
def test_every_expert_gets_exactly_c_tokens(scope, batch):
  t, n = 64, 8
  x = jax.random.normal(jax.random.key(0), (t, 16))
  router = _router(n, ec_scope=scope)
  v = router.init(jax.random.key(1), x)
  ec = router.apply(v, x, batch=batch, train=True).expert_choice
  per_scope = t // batch
  c = int(np.ceil(per_scope * 2.0 / n))
  assert ec.token_index.shape == (n, batch * c)
  for row in np.asarray(ec.token_index):
    assert len(set(row.tolist())) == len(row)  # distinct tokens
    if scope == 'sequence':  # C of each sequence, for every expert
      np.testing.assert_array_equal(np.bincount(row // per_scope, minlength=batch), c)


def _layer(**router):
  moe = base_config().model.moe
  moe.num_experts, moe.expert_ffn_dim, moe.num_shared_experts = 4, 8, 0
  moe.router.name = 'expert_choice'
  for k, v in router.items():
    moe.router[k] = v
  return MoEFFN(ml_collections.FrozenConfigDict(moe), 16)


def test_layer_matches_loop_reference():
  x = jax.random.normal(jax.random.key(2), (2, 8, 16))
  layer = _layer(ec_scope='sequence')
  params = nn.unbox(layer.init(jax.random.key(3), x))
  y, aux = layer.apply(params, x, train=True)
  p = params['params']
  tokens = np.asarray(x).reshape(-1, 16)
  probs = jax.nn.softmax(tokens @ np.asarray(p['router']['w']))
  ref = np.zeros_like(tokens, dtype=np.float64)
  for s in range(2):  # each sequence, each expert: its top C = 8 * 2 / 4 = 4 tokens
    for e in range(4):
      chosen = s * 8 + np.argsort(-np.asarray(probs[s * 8:(s + 1) * 8, e]), kind='stable')[:4]
      for t in chosen:
        ref[t] += loop_reference(tokens[t:t + 1], [[e]], [[probs[t, e]]], p['experts'])[0]
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 16), ref, rtol=1e-5, atol=1e-5)
  assert float(aux['max_vio']) == 0.0  # perfectly balanced by construction
  assert 0.0 <= float(aux['zero_expert_fraction']) < 1.0


def test_expert_choice_leaks_the_future_and_topk_eval_does_not():
  x = jax.random.normal(jax.random.key(4), (1, 16, 16))
  future = x.at[0, 12:].multiply(-3.0)  # change only the last tokens
  layer = _layer(ec_scope='sequence', ec_eval='topk')
  params = nn.unbox(layer.init(jax.random.key(5), x))
  train_a, _ = layer.apply(params, x, train=True)
  train_b, _ = layer.apply(params, future, train=True)
  assert not np.allclose(train_a[0, :12], train_b[0, :12])  # earlier tokens changed
  eval_a, _ = layer.apply(params, x, train=False)
  eval_b, _ = layer.apply(params, future, train=False)
  np.testing.assert_allclose(eval_a[0, :12], eval_b[0, :12], rtol=1e-6)
  m = base_config().model
  m.moe.router.name = 'expert_choice'
  assert not routing_is_causal(m, train=True) and routing_is_causal(m, train=False)
  m.moe.router.ec_eval = 'expert_choice'
  assert not routing_is_causal(m, train=False)
