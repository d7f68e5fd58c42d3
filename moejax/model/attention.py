"""Attention building blocks: the decoding cache, grouped-query attention (rotary embeddings:
rope.py; RMSNorm, SwiGLU and the parameter helpers: moejax/nn/layers.py).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from moejax.model.rope import apply_rope
from moejax.nn.layers import Dtype, RMSNorm, constrain, param_with_axes

__all__ = ['GroupedQueryAttention', 'apply_rope', 'update_cache']


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
  num_kv_heads key/value heads (num_heads % num_kv_heads == 0); causal, optionally chunked or
  within a sliding window, optionally with attention sinks and an output gate."""
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
  qk_norm_after_rope: bool = False  # 'head' / 'full' after the rotation instead of before it
  norm_eps: float = 1e-6
  qkv_bias: bool = False  # biases on the query, key and value projections
  rope_scaling: Any = None  # model.rope_scaling (rope.py), or None
  rotary_dim: int = 0  # rotate the first rotary_dim dims of each head (0: all of them)
  # Layers without the rotation (use_rope False) attend to all earlier positions; layers with
  # it, to the earlier positions of their chunk of `chunk` positions (0: no chunks).
  chunk: int = 0
  # Without the rotation, queries are scaled by 1 + scale * log(1 + floor((pos + 1) / floor))
  # (attention temperature tuning, arXiv:2501.19399); scale 0: off.
  temperature: tuple = (0.0, 8192)
  # Layers called with sliding=True attend to the `window` latest positions, their own
  # included (key position > query position - window); 0: no window.
  window: int = 0
  # A learned logit per head that joins each query's softmax as an extra column with no value
  # (attention sinks): the weights over the real keys then sum to less than 1.
  sinks: bool = False
  out_bias: bool = False  # a bias on the output projection
  # The output of each head scaled by sigmoid(x W_gate) [b, s, h, hd] before the output
  # projection (gated attention, arXiv:2505.06708).
  output_gate: bool = False
  scale: float = 0.0  # the attention logits' scale; 0: head_dim ** -0.5

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
  def __call__(self, x, positions, use_rope=True, sliding=False):
    """Causal self-attention of a block.

    Args:
      x: [b, s, d] the normed block input.
      positions: [b, s] int32 absolute positions (decoding: of the new tokens).
      use_rope: a (possibly traced) bool, False for the layers without rotary embedding.
      sliding: a (possibly traced) bool, True for the layers attending within `window`.
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
    if not self.qk_norm_after_rope:
      q, k = self._qk_norm(q, 'q_norm'), self._qk_norm(k, 'k_norm')
    rq = apply_rope(q, positions, self.rope_theta, self.rope_scaling, self.rotary_dim)
    rk = apply_rope(k, positions, self.rope_theta, self.rope_scaling, self.rotary_dim)
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
    if self.qk_norm_after_rope:
      q, k = self._qk_norm(q, 'q_norm'), self._qk_norm(k, 'k_norm')
    q = constrain(q, ('batch', 'length', 'act_heads', None))
    key_pos = positions  # [b, s]
    if self.cache_len:
      cache, key_pos = update_cache(self, {'k': k, 'v': v}, self.cache_len)
      k, v, key_pos = cache['k'], cache['v'], key_pos[None]  # [b, L, kv, hd]
    q = q.reshape(b, s, kv, h // kv, hd)  # [b, s, kv, group, hd]
    logits = jnp.einsum('bqkgd,bskd->bkgqs', q, k).astype(jnp.float32) * (
        self.scale or hd ** -0.5)
    causal = positions[:, None, None, :, None] >= key_pos[:, None, None, None, :]
    if self.chunk:
      same = (positions[:, None, None, :, None] // self.chunk ==
              key_pos[:, None, None, None, :] // self.chunk)
      causal = causal & (same | jnp.logical_not(use_rope))
    if self.window:
      near = (positions[:, None, None, :, None] - key_pos[:, None, None, None, :] <
              self.window)
      causal = causal & (near | jnp.logical_not(sliding))
    logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    if self.sinks:  # one more column per query: the head's sink logit, dropped after softmax
      sink = param_with_axes(self, 'sinks', (h,), ('heads',), nn.initializers.zeros)
      sink = jnp.broadcast_to(sink.reshape(kv, h // kv)[None, :, :, None, None],
                              logits.shape[:-1] + (1,))
      probs = jax.nn.softmax(jnp.concatenate([logits, sink], axis=-1), axis=-1)[..., :-1]
    else:
      probs = jax.nn.softmax(logits, axis=-1)
    probs = probs.astype(self.dtype)  # [b, kv, group, q, s]
    out = jnp.einsum('bkgqs,bskd->bqkgd', probs, v).reshape(b, s, h, hd)
    if self.output_gate:
      wg = param_with_axes(self, 'wg', (d, h, hd), ('embed', 'heads', 'head_dim'))
      out = out * jax.nn.sigmoid(jnp.einsum('bsd,dhk->bshk', x, wg.astype(self.dtype)))
    out = jnp.einsum('bshk,hkd->bsd', out, wo.astype(self.dtype))
    if self.out_bias:
      out = out + param_with_axes(self, 'bo', (d,), ('embed',),
                                  nn.initializers.zeros).astype(out.dtype)
    return constrain(out, ('batch', 'length', 'act_embed'))
