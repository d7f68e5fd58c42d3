"""Gated DeltaNet: linear attention whose state is corrected by the delta rule and decays by a
learned gate (arXiv:2412.06464; the linear layers of Qwen3-Next and Qwen3.5-MoE).

Each value head keeps a state S, a [dk, dv] matrix. With k_t and q_t L2-normalised and q_t
scaled by dk ** -0.5, a decay g_t <= 0 (log space) and a write strength beta_t in (0, 1):

  S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T
  o_t = S_t^T q_t

`gated_delta_rule` computes it in chunks (training and prefill: within a chunk, the WY/UT
form of the delta rule turns the recurrence into matrix products and one triangular solve per
chunk; a scan carries S across chunks); `gated_delta_recurrence` computes it token by token (a
decode step). Both take and return the state, so decoding continues a prefill exactly.

The layer (`GatedDeltaNet`) projects queries, keys, values, an output gate z and the per-head
beta and decay inputs from x; queries, keys and values pass a short causal depthwise
convolution with SiLU; the output is RMS-normalised per head, gated by SiLU(z) and projected
back. Key heads may be fewer than value heads: key head i serves value heads
[i * r, (i + 1) * r), r = value heads / key heads.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.nn.layers import Dtype, constrain, param_with_axes

__all__ = ['GatedDeltaNet', 'causal_conv', 'gated_delta_recurrence', 'gated_delta_rule',
           'l2_normalize']


def l2_normalize(x, eps: float = 1e-6):
  """x / sqrt(sum(x^2) + eps) over the last axis, in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def gated_delta_recurrence(q, k, v, g, beta, state=None):
  """The gated delta rule token by token (q and k as given: normalise and scale them first).

  Args:
    q, k: [b, s, h, dk]; v: [b, s, h, dv]; beta: [b, s, h]; g (log decay, <= 0): [b, s, h]
      (one per head), or [b, s, h, dk] (one per key channel: each row of S decays apart, as
      Kimi Delta Attention's).
    state: [b, h, dk, dv] the state before the first token, or None (zeros).
  Returns:
    (o [b, s, h, dv], state [b, h, dk, dv] after the last token), float32.
  """
  q, k, v, g, beta = (t.astype(jnp.float32) for t in (q, k, v, g, beta))
  b, _, h, dk = k.shape
  if state is None:
    state = jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32)
  g = g if g.ndim == 4 else g[..., None]  # [b, s, h, dk or 1]

  def step(s, inputs):
    q_t, k_t, v_t, g_t, beta_t = inputs  # [b, h, dk] x 2, [b, h, dv], [b, h, dk | 1], [b, h]
    s = s * jnp.exp(g_t)[..., None]
    delta = (v_t - jnp.einsum('bhkv,bhk->bhv', s, k_t)) * beta_t[..., None]
    s = s + k_t[..., :, None] * delta[..., None, :]
    return s, jnp.einsum('bhkv,bhk->bhv', s, q_t)

  state, o = jax.lax.scan(step, state.astype(jnp.float32),
                          tuple(jnp.moveaxis(t, 1, 0) for t in (q, k, v, g, beta)))
  return jnp.moveaxis(o, 0, 1), state


def gated_delta_rule(q, k, v, g, beta, state=None, chunk: int = 64):
  """The gated delta rule in chunks of `chunk` tokens (the same numbers as
  gated_delta_recurrence up to rounding). The sequence is padded to a multiple of chunk with
  tokens that neither decay nor write the state (g = 0, beta = 0).

  Args and returns as gated_delta_recurrence.
  """
  q, k, v, g, beta = (t.astype(jnp.float32) for t in (q, k, v, g, beta))
  b, s, h, dk = k.shape
  dv = v.shape[-1]
  if state is None:
    state = jnp.zeros((b, h, dk, dv), jnp.float32)
  g = g if g.ndim == 4 else g[..., None]  # [b, s, h, dk or 1]
  pad = (-s) % chunk
  n = (s + pad) // chunk

  def chunks(t):  # [b, s, h, ...] -> [n, b, h, chunk, ...]
    t = jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
    t = t.reshape((b, n, chunk) + t.shape[2:])
    return jnp.moveaxis(jnp.moveaxis(t, 3, 2), 1, 0)

  q, k, v, g, beta = (chunks(t) for t in (q, k, v, g, beta))
  cum = jnp.cumsum(g, axis=-2)  # [n, b, h, c, dk | 1]: log of the decay from the chunk's start
  causal = jnp.tril(jnp.ones((chunk, chunk), bool))  # i >= j

  def decayed(a, c):
    """sum_k a_ik c_jk exp(cum_ik - cum_jk) for i >= j, 0 above: [n, b, h, c, c]. One decay
    per head factors out of the sum; one per channel weighs each channel (a [c, c, dk] tensor
    per chunk and head: memory c^2 dk, so such layers want short chunks)."""
    if cum.shape[-1] == 1:
      pair = jnp.where(causal, cum[..., :, None, 0] - cum[..., None, :, 0], -jnp.inf)
      return jnp.einsum('...ik,...jk->...ij', a, c) * jnp.exp(pair)
    pair = jnp.where(causal[..., None], cum[..., :, None, :] - cum[..., None, :, :], -jnp.inf)
    return jnp.einsum('...ik,...jk,...ijk->...ij', a, c, jnp.exp(pair))

  kb, vb = k * beta[..., None], v * beta[..., None]
  # (I + strictly-lower(beta_i k_i.k_j decay_ij)) [u | w] = [beta v | beta k decay_from_start]
  t = jnp.where(causal & ~jnp.eye(chunk, dtype=bool), decayed(kb, k), 0.0) + jnp.eye(chunk)
  rhs = jnp.concatenate([vb, kb * jnp.exp(cum)], axis=-1)
  uw = jax.lax.linalg.triangular_solve(t, rhs, left_side=True, lower=True,
                                       unit_diagonal=True)
  u, w = uw[..., :dv], uw[..., dv:]  # [n, b, h, c, dv], [n, b, h, c, dk]
  intra = decayed(q, k)  # [n, b, h, c, c]
  q_decayed = q * jnp.exp(cum)
  k_decayed = k * jnp.exp(cum[..., -1:, :] - cum)  # decay to the chunk's end
  chunk_decay = jnp.exp(cum[..., -1, :])[..., None]  # [n, b, h, dk | 1, 1]

  def step(s, inputs):
    u_i, w_i, q_i, k_i, intra_i, decay_i = inputs
    v_new = u_i - jnp.einsum('bhck,bhkv->bhcv', w_i, s)
    o = jnp.einsum('bhck,bhkv->bhcv', q_i, s) + jnp.einsum('bhcj,bhjv->bhcv', intra_i, v_new)
    s = s * decay_i + jnp.einsum('bhck,bhcv->bhkv', k_i, v_new)
    return s, o

  state, o = jax.lax.scan(step, state.astype(jnp.float32),
                          (u, w, q_decayed, k_decayed, intra, chunk_decay))
  o = jnp.moveaxis(o, 0, 1)  # [b, n, h, c, dv]
  o = jnp.moveaxis(o, 3, 2).reshape(b, n * chunk, h, dv)[:, :s]
  return o, state


def causal_conv(x, w, state=None):
  """Depthwise causal convolution along the sequence: out[t] = sum_j w[j] x[t - K + 1 + j].

  Args:
    x: [b, s, ...channels]; w: [K, ...channels].
    state: [b, K - 1, ...channels] the K - 1 inputs before x (None: zeros).
  Returns:
    (out [b, s, ...channels] float32, the new state: the last K - 1 inputs).
  """
  kernel = w.shape[0]
  if state is None:
    state = jnp.zeros((x.shape[0], kernel - 1) + x.shape[2:], x.dtype)
  full = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [b, K - 1 + s, ...]
  s = x.shape[1]
  out = sum(full[:, j:j + s].astype(jnp.float32) * w[j].astype(jnp.float32)
            for j in range(kernel))
  return out, full[:, s:]


class GatedDeltaNet(nn.Module):
  """A Gated DeltaNet token mixer: [b, s, d] -> [b, s, d].

  cache_len > 0 builds the decoding layer: it keeps its convolution inputs and its state in the
  collection 'cache' and continues from them on every call (prefill, then one token a step).
  """
  num_key_heads: int
  num_value_heads: int
  key_head_dim: int
  value_head_dim: int
  conv_kernel: int = 4
  norm_eps: float = 1e-6
  chunk: int = 64
  dtype: Dtype = jnp.float32
  cache_len: int = 0
  # 'head': one decay per value head (Gated DeltaNet); 'channel': one per key channel of each
  # value head, its inputs [hv, dk] (Kimi Delta Attention).
  decay: str = 'head'
  # > 0: the output gate and a per-channel decay's inputs through a rank-gate_rank bottleneck
  # (x W_down W_up); 0: one full projection each.
  gate_rank: int = 0
  gate_fn: str = 'silu'  # the output gate's activation: 'silu' (Gated DeltaNet) or 'sigmoid'

  @nn.compact
  def __call__(self, x):
    """Args:
      x: [b, s, d] the normed block input.
    Returns:
      [b, s, d] in `dtype`.
    """
    b, s, d = x.shape
    hk, hv, dk, dv = (self.num_key_heads, self.num_value_heads, self.key_head_dim,
                      self.value_head_dim)
    if hv % hk:
      raise ValueError(f'value heads ({hv}) must be a multiple of key heads ({hk})')
    x = x.astype(self.dtype)

    def proj(name, shape, axes):
      return param_with_axes(self, name, (d,) + shape, ('embed',) + axes).astype(self.dtype)

    def gate_proj(name, shape, axes):  # x -> [b, s, *shape], full rank or through gate_rank
      if not self.gate_rank:
        return jnp.einsum('bsd,d...->bs...', x, proj(name, shape, axes))
      down = x @ proj(f'{name}_down', (self.gate_rank,), (None,))
      up = param_with_axes(self, f'{name}_up', (self.gate_rank,) + shape, (None,) + axes)
      return jnp.einsum('bsr,r...->bs...', down, up.astype(self.dtype))

    q = jnp.einsum('bsd,dhk->bshk', x, proj('wq', (hk, dk), ('kv_heads', 'head_dim')))
    k = jnp.einsum('bsd,dhk->bshk', x, proj('wk', (hk, dk), ('kv_heads', 'head_dim')))
    v = jnp.einsum('bsd,dhk->bshk', x, proj('wv', (hv, dv), ('heads', 'head_dim')))
    z = gate_proj('wz', (hv, dv), ('heads', 'head_dim'))
    beta_in = jnp.einsum('bsd,dh->bsh', x, proj('wb', (hv,), ('heads',)))
    decay_shape, decay_axes = ((hv, dk), ('heads', 'head_dim')) if self.decay == 'channel' else (
        (hv,), ('heads',))
    decay_in = (gate_proj('wa', decay_shape, decay_axes) if self.decay == 'channel' else
                jnp.einsum('bsd,dh->bsh', x, proj('wa', (hv,), ('heads',))))

    decoding = self.cache_len > 0
    initializing = decoding and not self.has_variable('cache', 'state')

    def conv(name, t, heads):
      w = param_with_axes(self, name, (self.conv_kernel, heads, t.shape[-1]),
                          (None, 'heads' if heads == hv else 'kv_heads', 'head_dim'),
                          nn.initializers.normal(stddev=self.conv_kernel ** -0.5))
      if not decoding:
        out, _ = causal_conv(t, w)
        return jax.nn.silu(out)
      var = self.variable('cache', f'{name}_state', jnp.zeros,
                          (b, self.conv_kernel - 1) + t.shape[2:], self.dtype)
      out, new = causal_conv(t, w, var.value)
      if not initializing:
        var.value = new.astype(self.dtype)
      return jax.nn.silu(out)

    q, k, v = conv('conv_q', q, hk), conv('conv_k', k, hk), conv('conv_v', v, hv)
    dt_bias = param_with_axes(self, 'dt_bias', decay_shape, decay_axes, nn.initializers.ones)
    a_log = param_with_axes(
        self, 'a_log', (hv,), ('heads',),
        lambda key, shape, dtype=jnp.float32: jnp.log(
            jax.random.uniform(key, shape, dtype, 1.0, 16.0)))
    rate = jnp.exp(a_log.astype(jnp.float32))
    g = -(rate[:, None] if self.decay == 'channel' else rate) * jax.nn.softplus(
        decay_in.astype(jnp.float32) + dt_bias.astype(jnp.float32))  # [b, s, hv(, dk)], <= 0
    beta = jax.nn.sigmoid(beta_in.astype(jnp.float32))
    q = l2_normalize(q) * dk ** -0.5
    k = l2_normalize(k)
    if hv != hk:  # key head i serves value heads i * r ... (i + 1) * r - 1
      q, k = jnp.repeat(q, hv // hk, axis=2), jnp.repeat(k, hv // hk, axis=2)

    state = None
    if decoding:
      state_var = self.variable('cache', 'state', jnp.zeros, (b, hv, dk, dv), jnp.float32)
      state = state_var.value
    if s == 1:
      o, new_state = gated_delta_recurrence(q, k, v, g, beta, state)
    else:
      o, new_state = gated_delta_rule(q, k, v, g, beta, state, self.chunk)
    if decoding and not initializing:
      state_var.value = new_state

    scale = param_with_axes(self, 'norm_scale', (dv,), ('head_dim',), nn.initializers.ones)
    o = o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + self.norm_eps)
    act = jax.nn.sigmoid if self.gate_fn == 'sigmoid' else jax.nn.silu
    o = (o * scale.astype(jnp.float32) * act(z.astype(jnp.float32))).astype(self.dtype)
    out = jnp.einsum('bshk,hkd->bsd', o, param_with_axes(
        self, 'wo', (hv, dv, d), ('heads', 'head_dim', 'embed'),
        nn.initializers.normal(stddev=(hv * dv) ** -0.5)).astype(self.dtype))
    return constrain(out, ('batch', 'length', 'act_embed'))
