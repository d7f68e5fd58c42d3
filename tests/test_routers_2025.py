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


@pytest.mark.parametrize('select_on', ['scores', 'logits'])
def test_the_selection_bias_on_the_scores_or_on_the_logits_by_hand(select_on):
  """Sigmoid scores with a selection bias: added to the scores (DeepSeek-V3) or to the logits
  (Kolibri) it picks different experts, as sigmoid squashes the logits' gap; the weights are
  the chosen experts' scores either way, renormalised."""
  logits = np.array([[2.0, 0.0, -1.0, 1.0]])
  bias = jnp.asarray([0.0, 0.9, 0.0, 0.0])
  router = _router(TopKRouter, 4, 2, score_fn='sigmoid', select_on=select_on)
  out = router.apply(_identity(4), jnp.asarray(logits), train=False, bias=bias)
  s = 1 / (1 + np.exp(-logits[0]))  # [0.881, 0.5, 0.269, 0.731]
  # scores + bias: [0.881, 1.4, 0.269, 0.731] -> 1, 0; logits + bias: [2, 0.9, -1, 1] -> 0, 3.
  want = [1, 0] if select_on == 'scores' else [0, 3]
  assert list(np.asarray(out.expert_index[0])) == want
  np.testing.assert_allclose(out.combine_weights[0], s[want] / s[want].sum(), rtol=1e-6)


def test_selection_on_the_logits_is_checked():
  c = base_config()
  c.model.moe.router.select_on = 'probs'
  with pytest.raises(ConfigError, match="config.model.moe.router.select_on='probs': must be"):
    validate(c, 1)
  c.model.moe.router.select_on = 'logits'
  c.model.moe.router.num_groups, c.model.moe.router.topk_groups = 2, 1
  with pytest.raises(ConfigError, match='config.model.moe.router.select_on=.*group-limited'):
    validate(c, 1)


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


def test_null_bias_balances_the_null_experts_too():
  """With router.null_bias the selection bias covers N + Z experts: its sign-rule step comes
  from the counts of all of them (null slots counted at ids N .. N + Z - 1), and a bias on a
  null expert changes how often it is chosen; without it the bias has N entries."""
  c = tiny_config()
  moe = c.model.moe
  moe.num_shared_experts, moe.router.null_experts = 0, 2
  moe.balance.bias_update_rate = 0.1
  x = jax.random.normal(jax.random.key(6), (2, 16, 32))
  plain = MoEFFN(ml_collections.FrozenConfigDict(moe), 32)
  assert plain.init(jax.random.key(7), x)['moe_state']['bias'].shape == (8,)
  moe.router.null_bias = True
  layer = MoEFFN(ml_collections.FrozenConfigDict(moe), 32)
  variables = nn.unbox(layer.init(jax.random.key(7), x))
  assert variables['moe_state']['bias'].shape == (10,)
  (_, aux), upd = layer.apply(variables, x, mutable=['bias_updates'])
  index = np.asarray(aux['expert_index']).reshape(-1)
  counts = np.bincount(index, minlength=10).astype(float)
  assert counts[8:].sum() > 0  # null slots are taken in this case
  np.testing.assert_allclose(upd['bias_updates']['bias'], 0.1 * np.sign(counts.mean() - counts))
  # A large bias on both null experts: every token fills its slots with them.
  variables['moe_state']['bias'] = jnp.array([0.] * 8 + [10., 10.])
  _, aux = layer.apply(variables, x)
  assert set(np.unique(np.asarray(aux['expert_index'])[..., :2])) == {8, 9}
  validate(c, 1)
  moe.router.null_experts = 0
  with pytest.raises(ConfigError, match=r'router.null_bias=True: biases the null experts'):
    validate(c, 1)


def _default_moe(beta=0.9):
  c = tiny_config()
  moe = c.model.moe
  moe.num_shared_experts, moe.default_outputs_decay = 0, beta
  moe.balance.aux_loss_weight = moe.balance.z_loss_weight = 0.0
  return c, MoEFFN(ml_collections.FrozenConfigDict(moe), 32)


def test_default_moe_forward_is_sparse_and_router_gradient_is_dense():
  """The output equals plain top-K's; the router weight's gradient gains, for each token,
  sum over its unchosen experts i of dL/dp_i = cot . Ehat_i (through the softmax), computed
  here by hand; the experts' gradients are unchanged."""
  c, layer = _default_moe()
  x = jax.random.normal(jax.random.key(8), (2, 8, 32))
  variables = nn.unbox(layer.init(jax.random.key(9), x))
  ehat = jax.random.normal(jax.random.key(10), (8, 32))
  variables['moe_state']['default_out'] = ehat
  c.model.moe.default_outputs_decay = 0.0
  plain = MoEFFN(ml_collections.FrozenConfigDict(c.model.moe), 32)
  y, aux = layer.apply(variables, x)
  y0, _ = plain.apply({'params': variables['params']}, x)
  eps = np.finfo(np.float32).eps  # the two paths sum in other orders: a few eps of the scale
  np.testing.assert_allclose(y, y0, rtol=0, atol=x.shape[-1] * eps * np.abs(y0).max())
  cot = jax.random.normal(jax.random.key(11), y.shape)
  grad = lambda lyr, v: jax.grad(lambda p: jnp.sum(lyr.apply({**v, 'params': p}, x)[0] * cot))(
      v['params'])
  g, g0 = grad(layer, variables), grad(plain, {'params': variables['params']})
  # (plain dropless runs the fused blocked kernel, Default MoE the sorted path: float32 sums
  # over the 16 tokens in another order, below tokens * eps32 of the gradient's scale)
  np.testing.assert_allclose(g['experts']['wi_0'], g0['experts']['wi_0'], rtol=0,
                             atol=16 * eps * np.abs(g0['experts']['wi_0']).max())
  # By hand: the extra term's gradient on the router weight W (logits = t W, p = softmax).
  t = np.asarray(x, np.float64).reshape(-1, 32)
  w = np.asarray(variables['params']['router']['w'], np.float64)
  logits = t @ w
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  unchosen = np.ones_like(p, bool)
  np.put_along_axis(unchosen, np.asarray(aux['expert_index']), False, -1)
  dp = np.where(unchosen, np.asarray(cot, np.float64).reshape(-1, 32) @ np.asarray(ehat).T, 0)
  dlogits = p * (dp - (p * dp).sum(-1, keepdims=True))  # softmax's Jacobian
  # g and g0 are float32 sums over the 16 tokens of terms up to their own size; their
  # difference keeps their rounding, below tokens * eps32 of the larger gradient's scale.
  scale = max(np.abs(g['router']['w']).max(), np.abs(g0['router']['w']).max())
  np.testing.assert_allclose(g['router']['w'] - g0['router']['w'], t.T @ dlogits, rtol=0,
                             atol=len(t) * eps * scale)


def test_default_moe_ema_update_by_hand():
  """One training step: each expert with tokens moves its default output toward the mean of
  its (ungated) outputs over them by 1 - beta; an expert without tokens keeps its own."""
  _, layer = _default_moe(beta=0.75)
  x = jax.random.normal(jax.random.key(12), (1, 6, 32))
  variables = nn.unbox(layer.init(jax.random.key(13), x))
  variables['moe_state']['default_out'] = jnp.ones((8, 32))
  (_, aux), upd = layer.apply(variables, x, mutable=['bias_updates'])
  delta = np.asarray(upd['bias_updates']['default_out'])
  index = np.asarray(aux['expert_index'])
  e = variables['params']['experts']
  tokens = np.asarray(x[0], np.float64)
  for i in range(8):
    rows = np.nonzero((index == i).any(-1))[0]
    if not len(rows):
      np.testing.assert_array_equal(delta[i], 0)
      continue
    h = tokens[rows] @ np.asarray(e['wi_0'][i])
    out = (h / (1 + np.exp(-h)) * (tokens[rows] @ np.asarray(e['wi_1'][i]))) @ np.asarray(
        e['wo'][i])
    np.testing.assert_allclose(delta[i], 0.25 * (out.mean(0) - 1.0), rtol=1e-4, atol=1e-6)
  assert (index != index[0, 0]).any() and len(np.unique(index)) < 8  # some idle, some not


def test_default_moe_is_checked():
  c, _ = _default_moe()
  validate(c, 1)
  c.model.moe.dispatch.name = 'capacity'
  with pytest.raises(ConfigError, match=r"default_outputs_decay=0.9: .*dispatch.name='dropless'"):
    validate(c, 1)
  c.model.moe.dispatch.name, c.model.moe.default_outputs_decay = 'dropless', 1.0
  with pytest.raises(ConfigError, match=r'default_outputs_decay=1.0: must be in \[0, 1\)'):
    validate(c, 1)


def test_default_moe_trains_and_its_state_moves():
  """Through the train step on 8 devices: the default outputs start at 0 and move, the loss is
  finite."""
  from conftest import trainer_on
  c, _ = _default_moe()
  trainer = trainer_on(c, dict(data=8, fsdp=1, expert=1, tensor=1))
  state = trainer.init(0)
  rng = np.random.default_rng(0)
  rows = rng.integers(0, 256, (8, 17)).astype(np.int32)
  for _ in range(2):
    state, m = trainer.train_step(state, {'inputs': rows[:, :-1], 'targets': rows[:, 1:]})
  assert np.isfinite(float(m['train/loss']))
  moved = np.asarray(state.model_state['moe_state']['moe_layers']['moe_block']['moe'][
      'default_out'])
  assert moved.shape == (2, 8, 32) and np.abs(moved).max() > 0


def test_sparsemixer_evaluation_by_hand():
  """Logits (4, 3.9, 1, -2), eps 0.02: the candidates of slot 1 are those within 2 eps of the
  best relative to max(|l|, best): 4 and 3.9 ((4 - 3.9) / 4 = 0.025 is not > 0.04); weight =
  softmax over them at 4. Slot 2 (4 taken, best 3.9): (3.9 - 1) / 3.9 > 0.04 drops 1, so 3.9
  alone, weight 1."""
  from moejax.moe.routers.sparsemixer import SparseMixerRouter
  router = _router(SparseMixerRouter, 4, 2, sparsemixer_eps=0.02)
  out = router.apply(_identity(4), jnp.array([[4.0, 3.9, 1.0, -2.0]]), train=False)
  np.testing.assert_array_equal(out.expert_index, [[0, 1]])
  np.testing.assert_allclose(out.combine_weights, [[1 / (1 + np.exp(-0.1)), 1.0]], rtol=1e-6)
  # A wider eps keeps expert 2 in slot 2's candidates: (3.9 - 1) / 3.9 = 0.74 <= 2 x 0.4.
  wide = _router(SparseMixerRouter, 4, 2, sparsemixer_eps=0.4)
  out = wide.apply(_identity(4), jnp.array([[4.0, 3.9, 1.0, -2.0]]), train=False)
  np.testing.assert_allclose(out.combine_weights[0, 1], 1 / (1 + np.exp(-2.9)), rtol=1e-6)
  # On the boundary: (4 - 3.5) / 4 = 0.125 = 2 x 0.0625, exact in binary. The rule drops only
  # logits past 2 eps, so 3.5 stays a candidate: slot 1's weight is softmax(4, 3.5) at 4.
  tie = _router(SparseMixerRouter, 4, 2, sparsemixer_eps=0.0625)
  out = tie.apply(_identity(4), jnp.array([[4.0, 3.5, 0.0, -1.0]]), train=False)
  np.testing.assert_allclose(out.combine_weights[0, 0], 1 / (1 + np.exp(-0.5)), rtol=1e-6)


def test_sparsemixer_training_samples_candidates_only_and_scales_by_heun():
  """Training: the sampled expert is always a candidate; its forward weight is the softmax
  weight times 1 or 0.3333; the gradient is that of the unscaled weight."""
  from moejax.moe.routers.sparsemixer import sparsemixer_slot
  logits = jnp.tile(jnp.array([[4.0, 3.9, 3.8, -2.0]]), (4000, 1))
  taken = jnp.zeros(logits.shape, bool)
  chosen, w = sparsemixer_slot(logits, taken, 0.05, jax.random.key(0))
  assert set(np.unique(chosen)) == {0, 1, 2}  # -2 is never a candidate
  p = np.asarray(jax.nn.softmax(jnp.array([4.0, 3.9, 3.8])))
  ratio = np.asarray(w) / p[np.asarray(chosen)]
  np.testing.assert_allclose(np.unique(ratio), [0.3333, 1.0], rtol=1e-5)
  assert (ratio[np.asarray(chosen) == 0] == 1).all()  # the best one is never scaled down
  # Non-best choices keep weight 1 with probability 1/4.
  assert abs(np.mean(ratio[np.asarray(chosen) != 0] == 1) - 0.25) < 0.04
  g = jax.grad(lambda l: jnp.sum(sparsemixer_slot(l, taken[:1], 0.05,
                                                  jax.random.key(1))[1]))(logits[:1])
  c = int(sparsemixer_slot(logits[:1], taken[:1], 0.05, jax.random.key(1))[0][0])
  want = p[c] * ((np.arange(3) == c) - p)
  np.testing.assert_allclose(g[0, :3], want, rtol=1e-5, atol=1e-7)
  assert float(g[0, 3]) == 0


def test_longrope_switches_factors_at_the_original_length():
  """Frequencies divided by the short factors while the call's positions stay within the
  original length, by the long ones past it; cos and sin scaled by the attention factor."""
  from moejax.model.rope import apply_rope, attention_factor
  s = {'kind': 'longrope', 'factor': 4.0, 'original_max_len': 8, 'attention_factor': 0.0,
       'short_factor': (1.0, 2.0), 'long_factor': (4.0, 8.0)}
  x = jnp.ones((1, 9, 1, 4))
  scale = attention_factor(s)
  assert scale == pytest.approx(np.sqrt(1 + np.log(4.0) / np.log(8)))
  for n, factors in ((8, (1.0, 2.0)), (9, (4.0, 8.0))):
    pos = jnp.arange(n)[None]
    got = np.asarray(apply_rope(x[:, :n], pos, 100.0, s))
    inv = 1 / (100.0 ** (np.arange(0, 4, 2) / 4) * np.array(factors))
    ang = np.arange(n)[:, None] * inv
    want = np.concatenate([np.cos(ang) - np.sin(ang), np.cos(ang) + np.sin(ang)], -1) * scale
    np.testing.assert_allclose(got[0, :, 0], want, rtol=1e-5, atol=1e-6)
