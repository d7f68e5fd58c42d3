"""The general attention features against NumPy transcriptions of their definitions: sliding
windows per layer (both edges of the window), attention sinks (a softmax with one more column),
the output gate and bias, partial rotary embedding; yarn frequencies against transformers'."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from moejax.model.attention import GroupedQueryAttention
from moejax.model.rope import apply_rope, attention_factor, rope_frequencies
from moejax.model.transformer import rotated_layer, sliding_layer

B, S, D, H, KV, HD = 2, 7, 12, 4, 2, 6


def _rope_np(x, pos, theta, rotary_dim, inv_freq=None, mscale=1.0):
  """x [s, h, hd]: the first rotary_dim dims rotated in half-split pairs, the rest kept."""
  r = rotary_dim
  if inv_freq is None:
    inv_freq = 1.0 / theta ** (np.arange(0, r, 2) / r)
  ang = pos[:, None] * inv_freq[None]  # [s, r/2]
  cos, sin = np.cos(ang)[:, None] * mscale, np.sin(ang)[:, None] * mscale
  x1, x2 = x[..., :r // 2], x[..., r // 2:r]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., r:]], axis=-1)


def _reference(p, x, window, sliding, sinks, gate, bias, rotary_dim, theta=100.0):
  """One sequence x [s, d], every head looped over, the mask written out element by element."""
  q = np.einsum('sd,dhk->shk', x, p['wq'])
  k = np.einsum('sd,dhk->shk', x, p['wk'])
  v = np.einsum('sd,dhk->shk', x, p['wv'])
  pos = np.arange(x.shape[0], dtype=np.float64)
  q, k = _rope_np(q, pos, theta, rotary_dim), _rope_np(k, pos, theta, rotary_dim)
  out = np.zeros((x.shape[0], H, HD))
  for h in range(H):
    g = h // (H // KV)
    for i in range(x.shape[0]):
      allowed = [j for j in range(x.shape[0]) if j <= i and (not sliding or i - j < window)]
      logits = np.array([q[i, h] @ k[j, g] / np.sqrt(HD) for j in allowed])
      cols = np.append(logits, p['sinks'][h]) if sinks else logits
      w = np.exp(cols - cols.max())
      w = w / w.sum()
      out[i, h] = sum(w[n] * v[j, g] for n, j in enumerate(allowed))
  if gate:
    out = out / (1 + np.exp(-np.einsum('sd,dhk->shk', x, p['wg'])))
  y = np.einsum('shk,hkd->sd', out, p['wo'])
  return y + p['bo'] if bias else y


@pytest.mark.parametrize('window,sliding,sinks,gate,bias,rotary_dim', [
    (3, True, False, False, False, 0),   # the window alone
    (3, False, False, False, False, 0),  # a full layer of a windowed model ignores the window
    (1, True, False, False, False, 0),   # the narrowest window: each token sees itself only
    (0, False, True, False, False, 0),   # sinks alone
    (0, False, False, True, True, 4),    # output gate, output bias, partial rotary
    (2, True, True, True, True, 2),      # all together
])
def test_attention_features_match_the_reference(window, sliding, sinks, gate, bias, rotary_dim):
  attn = GroupedQueryAttention(H, KV, HD, 100.0, rotary_dim=rotary_dim, window=window,
                               sinks=sinks, out_bias=bias, output_gate=gate)
  x = jax.random.normal(jax.random.key(0), (B, S, D))
  pos = jnp.broadcast_to(jnp.arange(S), (B, S))
  params = nn.unbox(attn.init(jax.random.key(1), x, pos))['params']
  # Every parameter random (the sinks and bias start at zero), sinks large enough to matter.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(tree, [jax.random.normal(k, l.shape) * (0.5 if l.ndim > 1 else 2.)
                                     for k, l in zip(keys, leaves)])
  got = attn.apply({'params': params}, x, pos, True, sliding)
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  for b in range(B):
    want = _reference(p, np.asarray(x[b], np.float64), window, sliding, sinks, gate, bias,
                      rotary_dim or HD)
    np.testing.assert_allclose(got[b], want, rtol=1e-4, atol=1e-5)


def test_sinks_take_weight_from_the_real_keys():
  """A very large sink logit leaves almost nothing for the values: the output goes to 0 (a
  sink that joined after the softmax, or renormalised, would not)."""
  attn = GroupedQueryAttention(H, KV, HD, 100.0, sinks=True)
  x = jax.random.normal(jax.random.key(0), (1, S, D))
  pos = jnp.arange(S)[None]
  params = nn.unbox(attn.init(jax.random.key(1), x, pos))['params']
  base = attn.apply({'params': params}, x, pos)
  params['sinks'] = jnp.full((H,), 30.0)
  assert float(jnp.max(jnp.abs(attn.apply({'params': params}, x, pos)))) < 1e-8
  assert float(jnp.max(jnp.abs(base))) > 1e-2


def test_sliding_pattern_repeats_over_the_layers():
  c = ml_collections.ConfigDict({'sliding_window': 4, 'sliding_pattern': (1, 0, 0)})
  assert [bool(sliding_layer(c, jnp.asarray(i))) for i in range(7)] == [
      True, False, False, True, False, False, True]
  c.sliding_window = 0
  assert sliding_layer(c, 3) is False
  c.sliding_window, c.sliding_pattern = 4, (1,)
  assert sliding_layer(c, 5) is True


@pytest.mark.parametrize('rope_layers', ['all', 'windowed'])
def test_rotary_embedding_on_every_layer_or_on_the_windowed_ones(rope_layers):
  """rope_layers='windowed' rotates only the layers of the window pattern (Flint, EXAONE 4:
  no positions on the full-attention layers), traced or not, and keeps nope_every's NoPE
  layers; with 'all', every layer but those rotates; without a window, every layer."""
  c = ml_collections.ConfigDict({'sliding_window': 4, 'sliding_pattern': (1, 1, 0),
                                 'nope_every': 2, 'rope_layers': rope_layers})
  windowed = [True, True, False, True, True, False]
  not_nope = [True, False, True, False, True, False]
  want = [w and n for w, n in zip(windowed, not_nope)] if rope_layers == 'windowed' else not_nope
  assert [bool(rotated_layer(c, i)) for i in range(6)] == want
  assert [bool(rotated_layer(c, jnp.asarray(i))) for i in range(6)] == want
  c.nope_every = 0
  assert [bool(rotated_layer(c, i)) for i in range(6)] == (
      windowed if rope_layers == 'windowed' else [True] * 6)
  c.sliding_window = 0
  assert [bool(rotated_layer(c, i)) for i in range(6)] == [True] * 6


def test_rotary_embedding_on_the_windowed_layers_is_checked():
  from moejax.checks import validate
  from moejax.config import ConfigError, base_config
  c = base_config()
  c.model.rope_layers = 'some'
  with pytest.raises(ConfigError, match="config.model.rope_layers='some': must be one of"):
    validate(c, 1)
  c.model.rope_layers = 'windowed'  # without a window every layer rotates (EXAONE 4)
  validate(c, 1)
  assert rotated_layer(c.model, 3) is True
  c.model.attention = 'mla'
  with pytest.raises(ConfigError, match="config.model.rope_layers='windowed'"):
    validate(c, 1)


def _yarn(factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False, original=4096,
          attention=0.0):
  return {'kind': 'yarn', 'factor': factor, 'beta_fast': beta_fast, 'beta_slow': beta_slow,
          'truncate': truncate, 'original_max_len': original, 'attention_factor': attention}


@pytest.mark.parametrize('truncate', [False, True])
@pytest.mark.parametrize('head_dim,theta,original', [(64, 150000.0, 4096), (16, 10000.0, 4096),
                                                     (16, 10000.0, 131072)])
def test_yarn_frequencies_match_transformers(truncate, head_dim, theta, original):
  torch = pytest.importorskip('torch')
  from transformers import GptOssConfig
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  cfg = GptOssConfig(head_dim=head_dim, num_attention_heads=4, hidden_size=64,
                     max_position_embeddings=32 * original,
                     rope_parameters={'rope_type': 'yarn', 'rope_theta': theta, 'factor': 32.0,
                                      'beta_fast': 32.0, 'beta_slow': 1.0, 'truncate': truncate,
                                      'original_max_position_embeddings': original})
  inv_freq, scale = ROPE_INIT_FUNCTIONS['yarn'](cfg, torch.device('cpu'))
  ours = rope_frequencies(head_dim, theta, _yarn(truncate=truncate, original=original))
  np.testing.assert_allclose(ours, inv_freq.numpy(), rtol=1e-6)
  assert attention_factor(_yarn(truncate=truncate)) == pytest.approx(scale, rel=1e-12)
  plain = np.asarray(rope_frequencies(head_dim, theta))
  if original == 4096:  # the ramp has both ends in range: some dims kept, some divided
    assert np.isclose(ours, plain).any() and np.isclose(ours, plain / 32).any()
  else:  # its slow end (dim 8.6) lies past the last pair (d / 2 - 1 = 7): none fully divided
    assert np.isclose(ours, plain).any() and not np.isclose(ours, plain / 32).any()


def test_yarn_scales_cos_and_sin_and_partial_rotary_keeps_the_rest():
  x = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
  pos = jnp.arange(5)[None]
  s = _yarn(factor=4.0, original=8, attention=1.5)
  got = np.asarray(apply_rope(x, pos, 10000.0, s, rotary_dim=4))
  inv = np.asarray(rope_frequencies(4, 10000.0, s))
  want = _rope_np(np.asarray(x[0], np.float64), np.arange(5.0), 10000.0, 4, inv, 1.5)
  np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[..., 4:], np.asarray(x)[..., 4:])
  assert attention_factor(_yarn(factor=4.0)) == pytest.approx(0.1 * np.log(4.0) + 1)
  assert attention_factor({'kind': 'llama3'}) == 1.0


@pytest.mark.parametrize('after', [False, True])
def test_qk_norm_before_or_after_the_rotation(after):
  """Per-head RMSNorm of q and k (scales not 1) before or after the rotation: the two differ
  (the scale does not commute with the rotation) and each matches its order written out."""
  attn = GroupedQueryAttention(H, KV, HD, 100.0, qk_norm='head', qk_norm_after_rope=after)
  x = jax.random.normal(jax.random.key(0), (1, S, D))
  pos = jnp.arange(S)[None]
  params = nn.unbox(attn.init(jax.random.key(1), x, pos))['params']
  params['q_norm']['scale'] = jnp.linspace(0.5, 2.0, HD)
  params['k_norm']['scale'] = jnp.linspace(2.0, 0.5, HD)
  got = np.asarray(attn.apply({'params': params}, x, pos))[0]
  p = {k: np.asarray(v, np.float64) for k, v in params.items() if not isinstance(v, dict)}
  xs = np.asarray(x[0], np.float64)
  rms = lambda t, s: t / np.sqrt((t * t).mean(-1, keepdims=True) + 1e-6) * s
  q, k = np.einsum('sd,dhk->shk', xs, p['wq']), np.einsum('sd,dhk->shk', xs, p['wk'])
  qs, ks = np.asarray(params['q_norm']['scale']), np.asarray(params['k_norm']['scale'])
  ps = np.arange(S, dtype=np.float64)
  if after:
    q, k = rms(_rope_np(q, ps, 100.0, HD), qs), rms(_rope_np(k, ps, 100.0, HD), ks)
  else:
    q, k = _rope_np(rms(q, qs), ps, 100.0, HD), _rope_np(rms(k, ks), ps, 100.0, HD)
  v = np.einsum('sd,dhk->shk', xs, p['wv'])
  out = np.zeros((S, H, HD))
  for h in range(H):
    g = h // (H // KV)
    logits = q[:, h] @ k[:, g].T / np.sqrt(HD) + np.triu(np.full((S, S), -np.inf), 1)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    out[:, h] = (w / w.sum(-1, keepdims=True)) @ v[:, g]
  np.testing.assert_allclose(got, np.einsum('shk,hkd->sd', out, p['wo']), rtol=1e-4, atol=1e-5)
