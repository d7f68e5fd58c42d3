"""DeepSeek Sparse Attention (moejax/model/indexer.py in front of MLA): the indexer's scores
against a float64 NumPy transcription of the paper's equation (1), the top-k selection and the
KL loss by hand, the gradients each loss may and may not reach, the warm-up and a k covering
every key against dense MLA, decoding with the cache against the full pass, and the settings'
refusals. Whole-model parity with transformers' DeepSeek-V3.2 and GLM-5 is in
tests/test_hf_families.py."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax.core import meta

from moejax.model.indexer import LightningIndexer, indexer_loss, select_keys


def numpy_rope(x, positions, theta, rotary_dim):
  """The half-split rotation of the first rotary_dim dims, x [b, s, h, d] (float64)."""
  r = rotary_dim
  inv = theta ** (-np.arange(0, r, 2) / r)  # [r / 2]
  ang = positions[..., None].astype(np.float64) * inv  # [b, s, r / 2]
  cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
  a, b = x[..., :r // 2], x[..., r // 2:r]
  return np.concatenate([a * cos - b * sin, b * cos + a * sin, x[..., r:]], axis=-1)


def numpy_index_scores(x, q_lat, positions, p, rope_dim, theta):
  """arXiv:2512.02556 eq. (1): I[t, s] = sum_j w[t, j] ReLU(q[t, j] . k[s]), with DeepSeek's
  scales (q.k by d^-1/2, w by H^-1/2), the key a LayerNorm of x W_k, q and k rotated."""
  x, q_lat = x.astype(np.float64), q_lat.astype(np.float64)
  h, d = p['wq'].shape[1:]
  q = np.einsum('bsr,rhk->bshk', q_lat, p['wq'])
  k = x @ p['wk']
  k = (k - k.mean(-1, keepdims=True)) / np.sqrt(k.var(-1, keepdims=True) + 1e-6)
  k = k * p['k_norm']['scale'] + p['k_norm']['bias']
  q = numpy_rope(q, positions, theta, rope_dim)
  k = numpy_rope(k[:, :, None], positions, theta, rope_dim)[:, :, 0]
  w = x @ p['w_heads'] * h ** -0.5
  b, s = x.shape[:2]
  out = np.zeros((b, s, s))
  for i in range(b):
    for t in range(s):
      for u in range(s):
        out[i, t, u] = sum(w[i, t, j] * max(q[i, t, j] @ k[i, u] * d ** -0.5, 0.0)
                           for j in range(h))
  return out


def _indexer_inputs(b=2, s=7, d=12, r=10, h=3, dk=8):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(b, s, d)).astype(np.float32)
  q_lat = rng.normal(size=(b, s, r)).astype(np.float32)
  p = {'wq': rng.normal(size=(r, h, dk)) * 0.4, 'wk': rng.normal(size=(d, dk)) * 0.4,
       'k_norm': {'scale': rng.uniform(0.5, 1.5, dk), 'bias': rng.uniform(-0.5, 0.5, dk)},
       'w_heads': rng.normal(size=(d, h))}
  p = jax.tree.map(lambda a: np.asarray(a, np.float32), p)
  positions = np.broadcast_to(np.arange(3, 3 + s), (b, s)).astype(np.int32)  # not from 0
  return x, q_lat, positions, p


def test_index_scores_equal_the_papers_equation():
  x, q_lat, positions, p = _indexer_inputs()
  layer = LightningIndexer(num_heads=3, head_dim=8, rope_dim=4, rope_theta=100.0)
  got, key_pos = jax.jit(layer.apply)({'params': p}, x, q_lat, positions)
  want = numpy_index_scores(x, q_lat, positions, jax.tree.map(np.float64, p), 4, 100.0)
  assert (want > 0).any() and (want < 0).any() and (want == 0).any()  # ReLU and both signs
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(key_pos, positions)


def test_select_keys_by_hand():
  scores = jnp.asarray([[[5., 9., 1., 7.],
                         [3., 2., 8., 0.],
                         [4., 6., 6.5, 1.],
                         [0., 3., 2., 1.]]])
  causal = jnp.tril(jnp.ones((4, 4), bool))[None]
  got = np.asarray(select_keys(scores, causal, 2))
  # query 0 sees one key, query 1 two (all of them), query 2 its best two of three (6.5, 6),
  # query 3 its best two of four (3, 2): never a later key, however high its score
  want = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0]]
  np.testing.assert_array_equal(got[0], np.asarray(want, bool))
  assert np.asarray(select_keys(scores, causal, 10)).sum() == 10  # k beyond t: every visible


def test_the_indexer_loss_is_the_kl_to_the_heads_summed_distribution():
  from scipy.special import rel_entr, softmax
  rng = np.random.default_rng(1)
  b, h, s = 2, 3, 5
  probs = rng.dirichlet(np.ones(s), size=(b, h, s))  # [b, h, s, t] rows summing to 1
  scores = rng.normal(size=(b, s, s))
  keys = np.tril(np.ones((s, s), bool))[None].repeat(b, 0)
  keys[1, 4, 2] = False  # a key left out of one query's set
  want = []
  for i in range(b):
    for t in range(s):
      sel = keys[i, t]
      p = probs[i, :, t, sel].sum(-1)  # summed over the heads
      p = p / p.sum()
      want.append(rel_entr(p, softmax(scores[i, t, sel])).sum())
  got = indexer_loss(jnp.asarray(scores, jnp.float32), jnp.asarray(probs, jnp.float32),
                     jnp.asarray(keys))
  # a query with one key has nothing to learn; every other one does
  assert all((w == 0.0) == (i % s == 0) for i, w in enumerate(want))
  np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)


def _mla_config(**mla):
  c = ml_collections.ConfigDict({
      'q_lora_rank': 12, 'kv_lora_rank': 10, 'qk_nope_head_dim': 6, 'qk_rope_head_dim': 4,
      'v_head_dim': 5, 'latent_norm_eps': 1e-6, 'index_topk': 3, 'index_heads': 4,
      'index_head_dim': 8, 'index_loss_weight': 1.0, 'index_warmup': False})
  c.update(mla)
  return ml_collections.FrozenConfigDict(c)


def _mla(cache_len=0, **mla):
  from moejax.model.mla import MultiHeadLatentAttention
  return MultiHeadLatentAttention(3, _mla_config(**mla), 1e4, cache_len=cache_len)


def _mla_inputs(b=2, s=9, d=16):
  x = jax.random.normal(jax.random.key(0), (b, s, d))
  return x, jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))


def test_warm_up_and_a_k_covering_every_key_are_dense_mla():
  x, pos = _mla_inputs()
  params = meta.unbox(_mla().init(jax.random.key(1), x, pos)['params'])
  dense_params = {k: v for k, v in params.items() if k != 'indexer'}
  dense = jax.jit(_mla(index_topk=0).apply)({'params': dense_params}, x, pos)
  sparse = jax.jit(_mla().apply)({'params': params}, x, pos)
  np.testing.assert_allclose(jax.jit(_mla(index_warmup=True).apply)({'params': params}, x, pos),
                             dense, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.jit(_mla(index_topk=9).apply)({'params': params}, x, pos),
                             dense, rtol=1e-6, atol=1e-6)
  # k = 3 of 9 keys: the first three queries see every key of theirs, the later ones do not
  np.testing.assert_allclose(sparse[:, :3], dense[:, :3], rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(sparse[:, 3:] - dense[:, 3:])).max() > 1e-3


def test_each_loss_reaches_only_its_own_parameters():
  """The indexer learns from its KL only; the attention, from the output only (the indexer's
  inputs are detached, the attention's probabilities taken without gradient)."""
  x, pos = _mla_inputs()
  for warmup in (False, True):
    layer = _mla(index_warmup=warmup)
    params = meta.unbox(layer.init(jax.random.key(1), x, pos)['params'])
    w_out = jax.random.normal(jax.random.key(2), (2, 9, 16))

    def losses(p, x):
      out, v = layer.apply({'params': p}, x, pos, mutable=['losses'])
      return jnp.sum(out * w_out), v['losses']['indexer']
    g_out = jax.jit(jax.grad(lambda p: losses(p, x)[0]))(params)
    g_idx = jax.jit(jax.grad(lambda p: losses(p, x)[1]))(params)
    assert losses(params, x)[1] > 0
    for name, g in jax.tree_util.tree_leaves_with_path(g_out['indexer']):
      assert not np.any(np.asarray(g)), name
    for name, g in jax.tree_util.tree_leaves_with_path(
        {k: v for k, v in g_idx.items() if k != 'indexer'}):
      assert not np.any(np.asarray(g)), name
    for name, g in jax.tree_util.tree_leaves_with_path(g_idx['indexer']):
      assert np.abs(np.asarray(g)).max() > 1e-6, name
    assert np.abs(np.asarray(g_out['wkv_b'])).max() > 1e-6
    # nor does the indexer's loss reach the block input
    g_x = jax.jit(jax.grad(lambda x: losses(params, x)[1]))(x)
    assert not np.any(np.asarray(g_x))


def test_decoding_with_the_cache_equals_the_full_pass():
  x, pos = _mla_inputs()
  params = meta.unbox(_mla().init(jax.random.key(1), x, pos)['params'])
  want = jax.jit(_mla().apply)({'params': params}, x, pos)
  dec = _mla(cache_len=12)
  cache = dec.init(jax.random.key(1), x[:, :1], pos[:, :1])['cache']
  step = jax.jit(lambda c, t, p: dec.apply({'params': params, 'cache': c}, t, p,
                                           mutable=['cache']))
  outs = []
  for lo, hi in ((0, 4), (4, 5), (5, 9)):  # a prefill beyond k = 3, one token, four more
    out, v = step(cache, x[:, lo:hi], pos[:, lo:hi])
    cache = v['cache']
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, axis=1), want, rtol=2e-5, atol=2e-5)


def test_a_model_with_sparse_attention_trains_its_indexer():
  """The train step adds each layer's indexer loss (reported unweighted as
  train/indexer_loss) and moves the indexers; evaluation runs without it."""
  from conftest import tiny_config, trainer_on
  c = tiny_config()
  c.model.attention = 'mla'
  c.model.mla.update(q_lora_rank=16, index_topk=4, index_heads=2, index_head_dim=16,
                     index_loss_weight=0.5)
  trainer = trainer_on(c, {'data': 1})
  state = trainer.init(0)
  before = jax.device_get(state.params)
  tokens = np.random.default_rng(0).integers(0, 256, (8, 17)).astype(np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}
  for _ in range(2):  # (the first step's learning rate is 0: warm-up)
    state, m = trainer.train_step(state, batch)
  kl = float(m['train/indexer_loss'])
  assert np.isfinite(kl) and kl > 0
  # the loss is the cross-entropy, the balance losses and 0.5 x the 3 layers' KL
  assert float(m['train/loss']) > float(m['train/ce_loss']) + 0.5 * 3 * kl - 1e-4
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       before, jax.device_get(state.params))
  indexer = [v for path, v in jax.tree_util.tree_leaves_with_path(moved)
             if 'indexer' in jax.tree_util.keystr(path)]
  # wq, wk, k_norm's scale and bias, w_heads, in the dense layers' stack and the MoE layers'
  assert len(indexer) == 10 and min(indexer) > 0
  assert np.isfinite(jax.device_get(trainer.eval_step(state, batch))['eval/loss'])


def test_costs_cache_and_parameters_by_hand():
  """FLOPs: the indexer scores every key (H_I (d_I + 1) per key, times 2), the attention
  reads index_topk of them (all in the warm-up); the cache keeps the indexer's key per token;
  the indexer's weights are matmul weights like any other."""
  from conftest import tiny_config
  from moejax.costs.flops import flops_per_token
  from moejax.costs.planner import cache_numbers
  from moejax.costs.parameters import count_params
  c = tiny_config()
  m = c.model
  m.attention = 'mla'
  m.mla.update(q_lora_rank=16, index_topk=5, index_heads=2, index_head_dim=20)
  qk, v = m.mla.qk_nope_head_dim + m.mla.qk_rope_head_dim, m.mla.v_head_dim
  dense = flops_per_token(_with(m, index_topk=0), 64)
  sparse = flops_per_token(m, 64)
  warm = flops_per_token(_with(m, index_warmup=True), 64)
  index = 2 * 64 * 2 * (20 + 1)
  assert dense['attention'] == 3 * 2 * 64 * m.num_heads * (qk + v)
  assert sparse['attention'] == 3 * (2 * 5 * m.num_heads * (qk + v) + index)
  assert warm['attention'] == dense['attention'] + 3 * index
  per_layer = 16 * 2 * 20 + m.d_model * 20 + m.d_model * 2  # wq, wk, w_heads
  assert sparse['matmul_weights'] - dense['matmul_weights'] == 3 * per_layer
  assert (count_params(m)['total'] - count_params(_with(m, index_topk=0))['total'] ==
          3 * (per_layer + 2 * 20))  # and k_norm's scale and bias
  assert cache_numbers(m)[0] - cache_numbers(_with(m, index_topk=0))[0] == 3 * 20


def _with(m, **mla):
  m = ml_collections.ConfigDict(m.to_dict())
  m.mla.update(mla)
  return m


@pytest.mark.parametrize('fields,says', [
    ({'model.mla.q_lora_rank': 0}, 'model.mla.index_topk.*needs model.mla.q_lora_rank'),
    ({'model.mla.index_head_dim': 2}, 'model.mla.index_head_dim.*at least'),
    ({'model.mla.index_heads': 0}, 'model.mla.index_heads'),
    ({'model.mla.index_topk': -1}, 'model.mla.index_topk'),
])
def test_bad_settings_are_one_line(fields, says):
  from conftest import tiny_config
  from moejax.checks import validate
  from moejax.config import ConfigError, set_fields
  c = tiny_config()
  set_fields(c, {'model.attention': 'mla', 'model.mla.q_lora_rank': 16,
                 'model.mla.index_topk': 4, **fields})
  with pytest.raises(ConfigError, match=says):
    validate(c, 1)
