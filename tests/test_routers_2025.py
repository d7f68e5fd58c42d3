"""The routers and balancing of 2025-26, by hand-worked cases: the sqrtsoftplus score, hash
routing in the first layers with learned weights, grouped top-K (K / M from each of M groups)
and the similarity-preserving router loss (SimBal)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from moejax.checks import validate
from moejax.config import base_config
from moejax.errors import ConfigError
from moejax.moe import losses
from moejax.moe.layer import MoEFFN
from moejax.moe.routers.grouped_topk import GroupedTopKRouter, grouped_top_k
from moejax.moe.routers.hashing import hash_table
from moejax.moe.routers.topk import TopKRouter
from moejax.moe.types import RouterOutput

from conftest import build_router, tiny_config


def _router(cls, n, k, **settings):
  r = base_config().model.moe.router
  for key, value in settings.items():
    r[key] = value
  return build_router(cls, ml_collections.FrozenConfigDict(r), n, k)


def _identity(n):  # x @ W = x: the tokens are the logits
  return {'params': {'w': jnp.eye(n)}}


def test_sqrtsoftplus_scores_by_hand():
  """s = sqrt(log(1 + e^l)); top-2 of s; weights s_i / (s_a + s_b) x 2.0."""
  logits = np.array([[2.0, -1.0, 0.5, 3.0]])
  router = _router(TopKRouter, 4, 2, score_fn='sqrtsoftplus', routed_scaling_factor=2.0)
  out = router.apply(_identity(4), jnp.asarray(logits), train=False)
  s = np.sqrt(np.log1p(np.exp(logits[0])))
  assert list(np.asarray(out.expert_index[0])) == [3, 0]
  np.testing.assert_allclose(out.combine_weights[0], 2.0 * s[[3, 0]] / (s[3] + s[0]),
                             rtol=1e-6)
  np.testing.assert_allclose(out.probs[0], s / s.sum(), rtol=1e-6)
  # Negative logits still score above 0 (unlike ReLU), below sigmoid's 0.5 at 0.
  assert 0 < float(s[1]) < np.sqrt(np.log(2))


@pytest.mark.parametrize('layer,hashed', [(0, True), (1, True), (2, False), (5, False)])
def test_hash_layers_route_by_the_table_with_learned_weights(layer, hashed):
  """hash_layers=2: layers 0 and 1 take the table's experts (not the best scores), weighted
  by the learned softmax scores at them, renormalised; layer 2 on selects top-K."""
  n, k, vocab = 8, 2, 16
  router = _router(TopKRouter, n, k, hash_layers=2, hash_kind='balanced')
  router = router.clone(vocab_size=vocab)
  logits = jax.random.normal(jax.random.key(0), (6, n)) * 3
  ids = jnp.array([0, 3, 5, 7, 11, 15])
  out = router.apply(_identity(n), logits, ids, train=False, layer=jnp.asarray(layer))
  p = np.asarray(jax.nn.softmax(logits, -1))
  table = hash_table(vocab, n, k, 'balanced', 0)
  want = table[np.asarray(ids)] if hashed else np.argsort(-p, -1)[:, :k]
  np.testing.assert_array_equal(np.sort(out.expert_index, -1), np.sort(want, -1))
  w = np.take_along_axis(p, np.asarray(out.expert_index), -1)
  np.testing.assert_allclose(out.combine_weights, w / w.sum(-1, keepdims=True), rtol=1e-5)
  if hashed:  # the table is not what top-K would choose here (the case tells them apart)
    assert (np.sort(want, -1) != np.sort(np.argsort(-p, -1)[:, :k], -1)).any()


def test_hash_layers_get_gradient_to_the_router():
  """The table picks, the weights learn: the router weight has a gradient in a hash layer."""
  n, k = 4, 2
  router = _router(TopKRouter, n, k, hash_layers=1).clone(vocab_size=8)
  x = jax.random.normal(jax.random.key(1), (5, n))
  ids = jnp.arange(5)

  def f(w):
    out = router.apply({'params': {'w': w}}, x, ids, train=False, layer=0)
    return jnp.sum(out.combine_weights * jnp.arange(k))
  assert float(jnp.abs(jax.grad(f)(jnp.eye(n))).sum()) > 0


def test_grouped_top_k_takes_k_over_m_from_every_group():
  """Scores where plain top-4 takes all of group 0: grouped top-K (M = 2) takes the best 2 of
  each group instead, so every group serves exactly K / M choices per token."""
  scores = jnp.array([[0.9, 0.8, 0.7, 0.6, 0.1, 0.2, 0.05, 0.3]])
  assert sorted(np.asarray(jax.lax.top_k(scores, 4)[1][0])) == [0, 1, 2, 3]
  np.testing.assert_array_equal(grouped_top_k(scores, 4, 2), [[0, 1, 7, 5]])
  np.testing.assert_array_equal(grouped_top_k(scores, 4, 4), [[0, 2, 5, 7]])
  x = jax.random.normal(jax.random.key(2), (64, 8))
  idx = np.asarray(grouped_top_k(x, 4, 2))
  assert ((idx < 4).sum(-1) == 2).all()  # balanced by construction, token by token


def test_grouped_topk_router_weights_and_bias():
  """Softmax scores, the selection bias moves the choice within a group, weights renormalised
  over the chosen (bias-free) scores."""
  router = _router(GroupedTopKRouter, 8, 4, expert_groups=2)
  logits = jnp.log(jnp.array([[0.3, 0.2, 0.1, 0.05, 0.1, 0.1, 0.05, 0.1]]))
  bias = jnp.array([0, 0, 0.5, 0, 0, 0, 0, 0])  # expert 2 overtakes 1 in group 0
  out = router.apply(_identity(8), logits, train=False, bias=bias)
  chosen = np.asarray(out.expert_index[0])
  assert sorted(chosen[:2]) == [0, 2] and all(4 <= e < 8 for e in chosen[2:])
  p = np.asarray(jax.nn.softmax(logits[0]))
  np.testing.assert_allclose(out.combine_weights[0], p[chosen] / p[chosen].sum(), rtol=1e-6)


def test_grouped_topk_is_checked():
  c = tiny_config()
  c.model.moe.router.name, c.model.moe.router.expert_groups = 'grouped_topk', 3
  with pytest.raises(ConfigError, match=r'router.expert_groups=3: must divide '
                                        r'model.moe.num_experts=8 and num_experts_per_tok=2'):
    validate(c, 1)
  c.model.moe.router.expert_groups, c.model.moe.router.num_groups = 2, 2
  with pytest.raises(ConfigError, match=r'router.num_groups=2: .*grouped top-K'):
    validate(c, 1)


def test_simbal_loss_by_hand_and_its_gradient():
  """|| W^T W - I ||_1 for a 3 x 2 router: columns (1, 0, 0) and (1, 1, 0) have the Gram
  matrix [[1, 1], [1, 2]], so the loss is 0 + 1 + 1 + 1 = 3; its gradient is 2 W sign(G - I)."""
  w = jnp.array([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
  r = RouterOutput(expert_index=None, combine_weights=None, probs=None, logits=None,
                   router_weight=w)
  assert float(losses.simbal_loss(r)) == pytest.approx(3.0)
  w2 = jax.random.normal(jax.random.key(3), (5, 4))
  g = jax.grad(lambda w: losses.simbal_loss(r.replace(router_weight=w)))(w2)
  s = np.sign(np.asarray(w2.T @ w2) - np.eye(4))
  np.testing.assert_allclose(g, 2 * np.asarray(w2) @ s, rtol=1e-5)
  q, _ = np.linalg.qr(np.asarray(w2))  # orthonormal columns: no loss
  assert float(losses.simbal_loss(r.replace(router_weight=jnp.asarray(q)))) < 1e-5


def test_simbal_loss_reaches_the_router_through_the_layer():
  """Weighted into the layer's loss, it has a gradient on the router weight and on nothing
  else; a router without weights does not offer it."""
  c = tiny_config()
  c.model.moe.balance.simbal_loss_weight = 0.1
  c.model.moe.balance.aux_loss_weight = 0.0
  layer = MoEFFN(ml_collections.FrozenConfigDict(c.model.moe), 32)
  x = jax.random.normal(jax.random.key(4), (2, 8, 32))
  params = nn.unbox(layer.init(jax.random.key(5), x))
  _, aux = layer.apply(params, x)
  w = params['params']['router']['w']
  assert float(aux['simbal_loss']) == pytest.approx(
      float(np.abs(np.asarray(w.T @ w) - np.eye(8)).sum()), rel=1e-5)
  assert float(aux['loss']) == pytest.approx(0.1 * float(aux['simbal_loss']) +
                                             1e-3 * float(aux['z_loss']), rel=1e-5)
  g = jax.grad(lambda p: layer.apply(p, x)[1]['simbal_loss'])(params)
  assert float(jnp.abs(g['params']['router']['w']).sum()) > 0
  assert float(jnp.abs(g['params']['experts']['wi_0']).sum()) == 0
  validate(c, 1)
  c.model.moe.router.name = 'hash'
  with pytest.raises(ConfigError, match=r'balance.simbal_loss_weight=0.1: is not read by'):
    validate(c, 1)
