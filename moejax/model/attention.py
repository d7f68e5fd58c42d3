"""Attention building blocks: rotary embeddings, the decoding cache, grouped-query attention.
(RMSNorm, SwiGLU and the parameter helpers are leaf modules in moejax/nn/layers.py.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from moejax.nn.layers import Dtype, RMSNorm, constrain, param_with_axes


def rope_frequencies(d: int, theta: float, scaling=None):
  """The d/2 rotation frequencies; scaling ('llama3', factor, low_freq_factor,
  high_freq_factor, original_max_len) stretches the long wavelengths as Llama 3/4 do."""
  inv_freq = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  if not scaling or scaling[0] == 'none':
    return inv_freq
  _, factor, low, high, original = scaling
  wavelen = 2 * jnp.pi / inv_freq
  low_wavelen, high_wavelen = original / low, original / high
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (original / wavelen - low) / max(high - low, 1e-9)  # no band when high == low
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, scaled)


def apply_rope(x, positions, theta: float, scaling=None):
  """Rotate x [b, s, h, d] by positions [b, s] (the half-split convention of GPT-NeoX/Llama)."""
  inv_freq = rope_frequencies(x.shape[-1], theta, scaling)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, s, d/2]
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _rms(t, eps: float):
  tf = t.astype(jnp.float32)
  return tf * jax.lax.rsqrt(jnp.mean(tf * tf, axis=-1, keepdims=True) + eps)


def update_cache(module: nn.Module, new: dict, cache_len: int):
  """Decoding: write `new` arrays [b, s, ...] at the cache index (collection 'cache') and
  return the whole cache [b, cache_len, ...] and the position of every entry [cache_len].

  Entries not written yet sit at positions beyond every query, so the causal mask hides them.
  """
  initializing = not module.has_variable('cache', 'index')
  index = module.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
  out = {}
  for name, value in new.items():
    shape = (value.shape[0], cache_len) + value.shape[2:]
    var = module.variable('cache', name, jnp.zeros, shape, value.dtype)
    if not initializing:
      var.value = jax.lax.dynamic_update_slice_in_dim(var.value, value, index.value, axis=1)
    out[name] = var.value
  if not initializing:
    index.value = index.value + next(iter(new.values())).shape[1]
  return out, jnp.arange(cache_len)


class GroupedQueryAttention(nn.Module):
  """Grouped-query attention with rotary embeddings: num_heads query heads share
  num_kv_heads key/value heads (num_heads % num_kv_heads == 0); causal, optionally chunked."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float
  dtype: Dtype = jnp.float32
  cache_len: int = 0  # > 0: decoding with a key/value cache of this many positions
  # RMSNorm of queries and keys before the rotation: 'head' (over each head's width, with one
  # scale of head_dim shared by the heads), 'full' (over the whole projection, a scale per
  # element) or 'none'.
  qk_norm: str = 'none'
  norm_eps: float = 1e-6
  qkv_bias: bool = False  # biases on the query, key and value projections
  rope_scaling: tuple = ()  # ('llama3', factor, low, high, original_max_len) or ()
  # Layers without the rotation (use_rope False) attend to all earlier positions; layers with
  # it, to the earlier positions of their chunk of `chunk` positions (0: no chunks).
  chunk: int = 0
  # Without the rotation, queries are scaled by 1 + scale * log(1 + floor((pos + 1) / floor))
  # (attention temperature tuning, arXiv:2501.19399); scale 0: off.
  temperature: tuple = (0.0, 8192)

  def _qk_norm(self, t, name: str):
    """t [b, s, heads, hd] -> normalised as qk_norm says ('l2' comes after the rotation)."""
    if self.qk_norm == 'head':
      return RMSNorm(self.norm_eps, self.dtype, name=name)(t)
    if self.qk_norm == 'full':
      b, s, h, hd = t.shape
      return RMSNorm(self.norm_eps, self.dtype, name=name)(t.reshape(b, s, h * hd)).reshape(
          b, s, h, hd)
    return t

  @nn.compact
  def __call__(self, x, positions, use_rope=True):
    """Causal self-attention of a block.

    Args:
      x: [b, s, d] the normed block input.
      positions: [b, s] int32 absolute positions (decoding: of the new tokens).
      use_rope: a (possibly traced) bool, False for the layers without rotary embedding.
    Returns:
      [b, s, d] in `dtype`.
    """
    b, s, d = x.shape
    h, kv, hd = self.num_heads, self.num_kv_heads, self.head_dim
    wq = param_with_axes(self, 'wq', (d, h, hd), ('embed', 'heads', 'head_dim'))
    wk = param_with_axes(self, 'wk', (d, kv, hd), ('embed', 'kv_heads', 'head_dim'))
    wv = param_with_axes(self, 'wv', (d, kv, hd), ('embed', 'kv_heads', 'head_dim'))
    wo = param_with_axes(self, 'wo', (h, hd, d), ('heads', 'head_dim', 'embed'),
                         nn.initializers.normal(stddev=(h * hd) ** -0.5))
    x = x.astype(self.dtype)
    q = checkpoint_name(jnp.einsum('bsd,dhk->bshk', x, wq.astype(self.dtype)),
                        'query_proj')  # [b, s, h, hd]
    k = checkpoint_name(jnp.einsum('bsd,dhk->bshk', x, wk.astype(self.dtype)),
                        'key_proj')  # [b, s, kv, hd]
    v = checkpoint_name(jnp.einsum('bsd,dhk->bshk', x, wv.astype(self.dtype)),
                        'value_proj')  # [b, s, kv, hd]
    if self.qkv_bias:
      zeros = nn.initializers.zeros
      q = q + param_with_axes(self, 'bq', (h, hd), ('heads', 'head_dim'), zeros).astype(q.dtype)
      k = k + param_with_axes(self, 'bk', (kv, hd), ('kv_heads', 'head_dim'), zeros).astype(
          k.dtype)
      v = v + param_with_axes(self, 'bv', (kv, hd), ('kv_heads', 'head_dim'), zeros).astype(
          v.dtype)
    q, k = self._qk_norm(q, 'q_norm'), self._qk_norm(k, 'k_norm')
    rq = apply_rope(q, positions, self.rope_theta, self.rope_scaling)
    rk = apply_rope(k, positions, self.rope_theta, self.rope_scaling)
    if self.qk_norm == 'l2':  # parameter-free, on the rotated layers only (Llama 4)
      rq = _rms(rq, self.norm_eps).astype(q.dtype)
      rk = _rms(rk, self.norm_eps).astype(k.dtype)
    if use_rope is True:
      q, k = rq, rk
    else:
      scale, floor = self.temperature
      if scale:
        pos = positions.astype(jnp.float32)[:, :, None, None]
        q = q * (1 + scale * jnp.log1p(jnp.floor((pos + 1) / floor))).astype(q.dtype)
      q, k = jnp.where(use_rope, rq, q), jnp.where(use_rope, rk, k)
    q = constrain(q, ('batch', 'length', 'act_heads', None))
    key_pos = positions  # [b, s]
    if self.cache_len:
      cache, key_pos = update_cache(self, {'k': k, 'v': v}, self.cache_len)
      k, v, key_pos = cache['k'], cache['v'], key_pos[None]  # [b, L, kv, hd]
    q = q.reshape(b, s, kv, h // kv, hd)  # [b, s, kv, group, hd]
    logits = jnp.einsum('bqkgd,bskd->bkgqs', q, k).astype(jnp.float32) * hd ** -0.5
    causal = positions[:, None, None, :, None] >= key_pos[:, None, None, None, :]
    if self.chunk:
      same = (positions[:, None, None, :, None] // self.chunk ==
              key_pos[:, None, None, None, :] // self.chunk)
      causal = causal & (same | jnp.logical_not(use_rope))
    logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)  # [b, kv, group, q, s]
    out = jnp.einsum('bkgqs,bskd->bqkgd', probs, v).reshape(b, s, h, hd)
    out = jnp.einsum('bshk,hkd->bsd', out, wo.astype(self.dtype))
    return constrain(out, ('batch', 'length', 'act_embed'))
