"""Gated DeltaNet (moejax/model/linear_attention.py) against a NumPy transcription of the
paper's recurrence (in float64; ours runs in float32), its own two forms against each other (values and gradients), the
decoding cache against the full pass, and transformers' Qwen3-Next layer (torch)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from moejax.model.linear_attention import (GatedDeltaNet, causal_conv, gated_delta_recurrence,
                                           gated_delta_rule)


def numpy_gated_delta(q, k, v, g, beta, state=None):
  """arXiv:2412.06464 eq. (10), as written there ([dv, dk] state, one token at a time):
  S_t = a_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T,  o_t = S_t q_t,  a_t = exp(g_t);
  with g [b, s, h, dk] (Kimi Delta Attention, arXiv:2510.26692) a_t is Diag(exp(g_t))
  on the key side: S_t = S_{t-1} Diag(a_t) (I - b_t k_t k_t^T) + b_t v_t k_t^T."""
  b, s, h, dk = k.shape
  dv = v.shape[-1]
  out = np.zeros((b, s, h, dv))
  final = np.zeros((b, h, dk, dv))
  for i in range(b):
    for j in range(h):
      st = np.zeros((dv, dk)) if state is None else state[i, j].T.copy()
      for t in range(s):
        kt = k[i, t, j][:, None]
        decay = np.diag(np.broadcast_to(np.exp(g[i, t, j]), (dk,)))
        st = (st @ decay @ (np.eye(dk) - beta[i, t, j] * kt @ kt.T) +
              beta[i, t, j] * v[i, t, j][:, None] @ kt.T)
        out[i, t, j] = st @ q[i, t, j]
      final[i, j] = st.T
  return out, final


def _inputs(seed, b=2, s=11, h=3, dk=4, dv=5, channel=False):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, s, h, dk)) / 2
  k = rng.normal(size=(b, s, h, dk))
  k /= np.linalg.norm(k, axis=-1, keepdims=True)  # the layer L2-normalises keys
  v = rng.normal(size=(b, s, h, dv))
  # decays from 0.99 to 0.22 per token (per key channel: some channels keep, some forget)
  g = -rng.uniform(0.01, 1.5, size=(b, s, h) + ((dk,) if channel else ()))
  beta = rng.uniform(0.05, 0.95, size=(b, s, h))
  state = rng.normal(size=(b, h, dk, dv))
  return q, k, v, g, beta, state


@pytest.mark.parametrize('channel', [False, True])  # one decay per head, or per key channel
@pytest.mark.parametrize('chunk', [1, 4, 16])  # 11 tokens: padded to 12, and one short chunk
def test_both_forms_equal_the_papers_recurrence(chunk, channel):
  q, k, v, g, beta, state = _inputs(0, channel=channel)
  want, want_state = numpy_gated_delta(q, k, v, g, beta, state)
  for got, got_state in (gated_delta_rule(q, k, v, g, beta, state, chunk),
                         gated_delta_recurrence(q, k, v, g, beta, state)):
    assert got.dtype == jnp.float32  # float32 by design: compared at its precision
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_state, want_state, rtol=1e-4, atol=1e-5)
  # without a state, from zeros
  want0, _ = numpy_gated_delta(q, k, v, g, beta)
  np.testing.assert_allclose(gated_delta_rule(q, k, v, g, beta, chunk=chunk)[0], want0,
                             rtol=1e-4, atol=1e-5)


def test_a_strong_write_overwrites_and_no_write_keeps_the_state():
  """Hand-worked: beta = 1 and no decay replace the value stored under key k_t by v_t (so
  reading with q = k_t returns v_t exactly); beta = 0 leaves the state alone but for decay."""
  k = np.zeros((1, 2, 1, 2)); k[0, 0, 0] = [1, 0]; k[0, 1, 0] = [1, 0]
  v = np.array([[[[3.0]], [[-2.0]]]])
  q = k.copy()
  g = np.zeros((1, 2, 1))
  o, s = gated_delta_rule(q, k, v, g, np.ones((1, 2, 1)), chunk=2)
  np.testing.assert_allclose(np.asarray(o)[0, :, 0, 0], [3.0, -2.0], atol=1e-6)
  np.testing.assert_allclose(np.asarray(s)[0, 0], [[-2.0], [0.0]], atol=1e-6)
  g = np.full((1, 2, 1), np.log(0.5))
  o, s = gated_delta_rule(q, k, v, g, np.array([[[1.0], [0.0]]]), chunk=2)
  np.testing.assert_allclose(np.asarray(o)[0, :, 0, 0], [3.0, 1.5], atol=1e-6)  # 3 * 0.5


@pytest.mark.parametrize('channel', [False, True])
def test_gradients_of_both_forms_agree(channel):
  q, k, v, g, beta, state = _inputs(1, s=9, channel=channel)
  w = np.random.default_rng(2).normal(size=(2, 9, 3, 5))

  def loss(fn, *args):
    o, s = fn(*args)
    return jnp.sum(o * w) + jnp.sum(s ** 2)

  args = tuple(jnp.asarray(a, jnp.float32) for a in (q, k, v, g, beta, state))
  chunked = jax.jit(jax.grad(lambda *a: loss(lambda *b: gated_delta_rule(*b, chunk=4), *a),
                             argnums=range(6)))(*args)
  stepped = jax.jit(jax.grad(lambda *a: loss(gated_delta_recurrence, *a),
                             argnums=range(6)))(*args)
  for name, a, b in zip('q k v g beta state'.split(), chunked, stepped):
    assert np.abs(np.asarray(b)).max() > 1e-3, name  # every input matters
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4, err_msg=name)


def test_causal_conv_by_hand_and_continued():
  x = np.arange(1.0, 6.0, dtype=np.float32).reshape(1, 5, 1)  # 1 2 3 4 5
  w = np.array([[0.5], [-1.0], [2.0]], np.float32)  # out[t] = 0.5 x[t-2] - x[t-1] + 2 x[t]
  out, state = causal_conv(x, w)
  np.testing.assert_allclose(np.asarray(out)[0, :, 0], [2.0, 3.0, 4.5, 6.0, 7.5])
  np.testing.assert_allclose(np.asarray(state)[0, :, 0], [4.0, 5.0])
  first, st = causal_conv(x[:, :2], w)
  rest, _ = causal_conv(x[:, 2:], w, st)
  np.testing.assert_allclose(np.concatenate([first, rest], axis=1), out)


LAYER = dict(num_key_heads=2, num_value_heads=4, key_head_dim=8, value_head_dim=6,
             conv_kernel=4, norm_eps=1e-6, chunk=4)


def _layer_params(seed=0, d=16):
  x = jax.random.normal(jax.random.key(seed), (2, 10, d))
  params = nn.meta.unbox(GatedDeltaNet(**LAYER).init(jax.random.key(seed + 1), x)['params'])
  # move the norm scale and dt_bias away from their initial ones
  params = dict(params)
  params['norm_scale'] = params['norm_scale'] + jax.random.normal(jax.random.key(7), (6,))
  params['dt_bias'] = jax.random.normal(jax.random.key(8), params['dt_bias'].shape)
  return x, params


def test_decoding_with_the_cache_equals_the_full_pass():
  x, params = _layer_params()
  want = jax.jit(GatedDeltaNet(**LAYER).apply)({'params': params}, x)
  layer = GatedDeltaNet(**LAYER, cache_len=16)
  cache = jax.jit(layer.init)(jax.random.key(0), x[:, :1])['cache']
  step = jax.jit(lambda c, t: layer.apply({'params': params, 'cache': c}, t, mutable=['cache']))
  outs = []
  # a prefill of 3 tokens (less than a chunk), two single steps, 5 tokens (more than a chunk)
  for lo, hi in ((0, 3), (3, 4), (4, 5), (5, 10)):
    out, v = step(cache, x[:, lo:hi])
    cache = v['cache']
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, axis=1), want, rtol=2e-5, atol=2e-5)


def test_layer_equals_transformers_qwen3_next():
  torch = pytest.importorskip('torch')
  from transformers import Qwen3NextConfig
  from transformers.models.qwen3_next import modeling_qwen3_next as m
  d = 16
  hk, hv, dk, dv, kernel = 2, 4, 8, 6, 4
  config = Qwen3NextConfig(hidden_size=d, linear_num_key_heads=hk, linear_num_value_heads=hv,
                           linear_key_head_dim=dk, linear_value_head_dim=dv,
                           linear_conv_kernel_dim=kernel, num_hidden_layers=1,
                           rms_norm_eps=1e-6)
  torch.manual_seed(0)
  ref = m.Qwen3NextGatedDeltaNet(config, 0).float().eval()
  for p in ref.parameters():
    torch.nn.init.normal_(p, std=0.3)
  with torch.no_grad():
    ref.A_log.copy_(torch.log(torch.rand(hv) * 4 + 0.1))
  x, _ = _layer_params(d=d)
  with torch.no_grad():
    want = ref(torch.tensor(np.asarray(x))).numpy()

  # transformers' layout: in_proj_qkvz rows per key head [q dk | k dk | v r*dv | z r*dv],
  # in_proj_ba per key head [b r | a r]; conv1d channels [q | k | v].
  r = hv // hk
  w = lambda t: t.detach().numpy()  # noqa: E731
  qkvz = w(ref.in_proj_qkvz.weight).reshape(hk, 2 * dk + 2 * r * dv, d)
  q, k = qkvz[:, :dk], qkvz[:, dk:2 * dk]
  v, z = qkvz[:, 2 * dk:2 * dk + r * dv], qkvz[:, 2 * dk + r * dv:]
  ba = w(ref.in_proj_ba.weight).reshape(hk, 2 * r, d)
  conv = w(ref.conv1d.weight)[:, 0, :].T  # [K, channels]
  params = {
      'wq': q.transpose(2, 0, 1), 'wk': k.transpose(2, 0, 1),
      'wv': v.reshape(hv, dv, d).transpose(2, 0, 1),
      'wz': z.reshape(hv, dv, d).transpose(2, 0, 1),
      'wb': ba[:, :r].reshape(hv, d).T, 'wa': ba[:, r:].reshape(hv, d).T,
      'conv_q': conv[:, :hk * dk].reshape(kernel, hk, dk),
      'conv_k': conv[:, hk * dk:2 * hk * dk].reshape(kernel, hk, dk),
      'conv_v': conv[:, 2 * hk * dk:].reshape(kernel, hv, dv),
      'dt_bias': w(ref.dt_bias), 'a_log': w(ref.A_log), 'norm_scale': w(ref.norm.weight),
      'wo': w(ref.out_proj.weight).T.reshape(hv, dv, d)}
  layer = GatedDeltaNet(hk, hv, dk, dv, kernel, 1e-6, chunk=4)
  got = jax.jit(layer.apply)({'params': params}, x)
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
  # gradients: with respect to the input against torch's autograd, and every parameter's
  w_out = np.random.default_rng(3).normal(size=want.shape).astype(np.float32)
  xt = torch.tensor(np.asarray(x), requires_grad=True)
  (ref(xt) * torch.tensor(w_out)).sum().backward()
  loss = lambda p, x: jnp.sum(layer.apply({'params': p}, x) * w_out)  # noqa: E731
  g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  np.testing.assert_allclose(g_x, xt.grad.numpy(), rtol=1e-4, atol=1e-5)
  for name, g in g_params.items():
    assert np.all(np.isfinite(g)) and np.abs(np.asarray(g)).max() > 1e-6, name


def test_kimi_delta_attention_layer_equals_transformers():
  """The same layer with a decay per key channel, the output gate and the decay's inputs
  through a rank-dk bottleneck and a sigmoid gate is transformers' KimiLinearDeltaAttention."""
  torch = pytest.importorskip('torch')
  from transformers import KimiLinearConfig
  from transformers.models.kimi_linear import modeling_kimi_linear as m
  d, h, dk, kernel = 16, 3, 6, 4
  config = KimiLinearConfig(hidden_size=d, linear_num_heads=h, linear_head_dim=dk,
                            linear_conv_kernel_dim=kernel, num_hidden_layers=1,
                            rms_norm_eps=1e-6, layer_types=['linear_attention'])
  torch.manual_seed(0)
  ref = m.KimiLinearDeltaAttention(config, 0).float().eval()
  for p in ref.parameters():
    torch.nn.init.normal_(p, std=0.3)
  with torch.no_grad():
    ref.forget_gate.A_log.copy_(torch.log(torch.rand(1, 1, h, 1) * 2 + 0.1))
  x = jax.random.normal(jax.random.key(0), (2, 10, d))
  with torch.no_grad():
    want = ref(torch.tensor(np.asarray(x))).numpy()
  w = lambda t: t.detach().numpy()  # noqa: E731
  heads = lambda t: w(t).reshape(h, dk, -1).transpose(2, 0, 1)  # noqa: E731  [r*, D] -> [D, h, dk]
  conv = w(ref.conv1d.weight)[:, 0, :].T  # [K, 3 h dk]: q, k, v channels
  fg = ref.forget_gate
  params = {
      'wq': heads(ref.q_proj.weight), 'wk': heads(ref.k_proj.weight),
      'wv': heads(ref.v_proj.weight), 'wb': w(ref.b_proj.weight).T,
      'wa_down': w(fg.f_a_proj.weight).T, 'wa_up': heads(fg.f_b_proj.weight),
      'dt_bias': w(fg.dt_bias).reshape(h, dk), 'a_log': w(fg.A_log).reshape(h),
      'wz_down': w(ref.g_a_proj.weight).T, 'wz_up': heads(ref.g_b_proj.weight),
      'conv_q': conv[:, :h * dk].reshape(kernel, h, dk),
      'conv_k': conv[:, h * dk:2 * h * dk].reshape(kernel, h, dk),
      'conv_v': conv[:, 2 * h * dk:].reshape(kernel, h, dk),
      'norm_scale': w(ref.o_norm.weight), 'wo': w(ref.o_proj.weight).T.reshape(h, dk, d)}
  layer = GatedDeltaNet(h, h, dk, dk, kernel, 1e-6, chunk=4, decay='channel', gate_rank=dk,
                        gate_fn='sigmoid')
  got = jax.jit(layer.apply)({'params': params}, x)
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
  # decoding continues the state: a prefill of 3 tokens, then one token at a time
  dec = GatedDeltaNet(h, h, dk, dk, kernel, 1e-6, chunk=4, decay='channel', gate_rank=dk,
                      gate_fn='sigmoid', cache_len=16)
  cache = jax.jit(dec.init)(jax.random.key(0), x[:, :1])['cache']
  step = jax.jit(lambda c, t: dec.apply({'params': params, 'cache': c}, t, mutable=['cache']))
  outs = []
  for lo, hi in ((0, 3), (3, 4), (4, 10)):
    out, v = step(cache, x[:, lo:hi])
    cache = v['cache']
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, axis=1), want, rtol=1e-4, atol=2e-5)


# --- Linear-attention layers in the model (model.linear_pattern) ------------------------------

def _hybrid_config(num_layers=10, first_k_dense=4, moe_layer_freq=2, pattern=(1, 1, 1, 0)):
  """By default 10 layers: 4 dense (one scanned step of the pattern), one period of
  lcm(4, 2) = 4 layers (MoE, dense, MoE, dense) and a tail of 2 (MoE, dense); every 4th layer
  attends."""
  from conftest import tiny_config
  c = tiny_config()
  m = c.model
  m.num_layers, m.first_k_dense, m.moe_layer_freq = num_layers, first_k_dense, moe_layer_freq
  m.linear_pattern = pattern
  m.linear.update(num_key_heads=2, num_value_heads=4, key_head_dim=8, value_head_dim=6,
                  conv_kernel=3, chunk=4)
  return c


def test_the_schedule_of_linear_layers_by_hand():
  from moejax.model import schedule
  from moejax.model.transformer import Transformer
  import ml_collections
  m = _hybrid_config().model
  want = [('dense_layers', 'block_0', 0, False, True), ('dense_layers', 'block_1', 0, False, True),
          ('dense_layers', 'block_2', 0, False, True), ('dense_layers', 'block_3', 0, False, False),
          ('moe_layers', 'moe_block', 0, True, True), ('moe_layers', 'dense_block_0', 0, False, True),
          ('moe_layers', 'moe_block_1', 0, True, True),
          ('moe_layers', 'dense_block_1', 0, False, False),
          ('tail_layers', 'moe_block', None, True, True),
          ('tail_layers', 'dense_block_0', None, False, True)]
  assert [tuple(s) for s in schedule.slots(m)] == want
  assert schedule.moe_layer_ids(m) == [4, 6, 8]
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = nn.meta.unbox(jax.eval_shape(Transformer(ml_collections.FrozenConfigDict(m)).init,
                                        jax.random.key(0), tokens)['params'])
  for stack, block, index, moe, linear in want:  # the model built what the schedule says
    p = params[stack][block]
    assert ('a_log' in p['attn']) == linear and ('wq' in p['attn'])
    assert ('moe' in p) == moe and ('ffn' in p) != moe
    assert p['attn']['wq'].ndim == (3 if index is None else 4)  # scanned stacks: a layer axis


# Gated DeltaNet; Kimi Delta Attention in the slow step (its layer's decoding is checked above)
@pytest.mark.parametrize('kda', [False, pytest.param(True, marks=pytest.mark.slow)])
def test_hybrid_model_decodes_and_replays(kda):
  import ml_collections
  from moejax.model.transformer import Transformer
  # 5 layers, linear and attention alternating, every layer MoE: two periods of two MoE blocks
  # (linear, attention) and a tail of one (linear)
  c = _hybrid_config(num_layers=5, first_k_dense=0, moe_layer_freq=1, pattern=(1, 0))
  if kda:
    c.model.linear.update(decay='channel', gate_rank=3, gate_fn='sigmoid')
  m = ml_collections.FrozenConfigDict(c.model)
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 256)
  model = Transformer(m, train=False)
  v = jax.jit(model.init)(jax.random.key(0), tokens)
  apply = jax.jit(model.apply)
  logits, aux = apply(v, tokens)
  # replaying the recorded routing reaches the same MoE blocks
  assert aux['expert_index'].shape == (5, 18, 2)
  np.testing.assert_array_equal(apply(v, tokens, None, aux['expert_index'])[0], logits)
  # decoding with the cache: a prefill of 4 tokens, one token, then 4 more
  dec = Transformer(m, train=False, cache_len=12)
  cache = jax.jit(dec.init)(jax.random.key(0), tokens[:, :1])['cache']
  step = jax.jit(lambda cache, t, pos: dec.apply({**v, 'cache': cache}, t, pos,
                                                 mutable=['cache']))
  pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
  outs = []
  for lo, hi in ((0, 4), (4, 5), (5, 9)):
    (out, _), mutated = step(cache, tokens[:, lo:hi], pos[:, lo:hi])
    cache = mutated['cache']
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, axis=1), logits, rtol=1e-4, atol=1e-4)


def test_linear_layers_cost_and_cache_by_hand():
  from moejax.costs.flops import flops_per_token
  from moejax.costs.planner import cache_numbers
  c = _hybrid_config()
  m = c.model
  hv, hk, dk, dv, chunk, kernel = 4, 2, 8, 6, 4, 3
  linear = hv * (2 * chunk * (2 * dk + dv) + chunk * (dk + dv) + 6 * dk * dv)
  full = 2 * 16 * m.num_heads * 2 * m.head_dim  # 16 positions, scores and weighted sum
  assert flops_per_token(m, 16)['attention'] == 8 * linear + 2 * full
  assert cache_numbers(m) == (2 * 2 * m.num_kv_heads * m.head_dim,  # per token: 2 full layers
                             8 * (kernel - 1) * (2 * hk * dk + hv * dv), 8 * hv * dk * dv)
  # a decay per key channel weighs each of the chunk's products (3 FLOPs per channel, not 2);
  # its inputs and the output gate through a rank-5 bottleneck are matmul weights like others
  head = flops_per_token(m, 16)
  m.linear.update(decay='channel', gate_rank=5)
  channel = flops_per_token(m, 16)
  assert channel['attention'] == 8 * hv * (2 * chunk * (3 * dk + dv) + chunk * (dk + dv) +
                                           6 * dk * dv) + 2 * full
  d = m.d_model
  assert channel['matmul_weights'] - head['matmul_weights'] == 8 * (
      (d * 5 + 5 * hv * dk) - d * hv + (d * 5 + 5 * hv * dv) - d * hv * dv)


@pytest.mark.parametrize('field,value,match', [
    ('linear_pattern', (1, 2), 'model.linear_pattern'),
    ('first_k_dense', 3, 'model.first_k_dense'),
    ('linear.num_value_heads', 3, 'model.linear.num_value_heads'),
    ('linear.chunk', 0, 'model.linear.chunk'),
    ('linear.decay', 'token', 'model.linear.decay'),
    ('linear.gate_fn', 'relu', 'model.linear.gate_fn'),
    ('linear.gate_rank', -1, 'model.linear.gate_rank')])
def test_linear_settings_refused_with_the_field(field, value, match):
  from moejax.checks import validate
  from moejax.config import ConfigError
  c = _hybrid_config()
  section, _, key = field.rpartition('.')
  (c.model[section] if section else c.model)[key] = value
  with pytest.raises(ConfigError, match=match):
    validate(c, 1)
