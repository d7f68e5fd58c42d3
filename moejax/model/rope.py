"""Rotary position embeddings: frequencies (plain, or stretched for long context by 'llama3' or
'yarn' scaling), and the rotation itself (half-split pairs, over all of a head's width or its
first `rotary_dim` dims).

`scaling` is a mapping with the fields of model.rope_scaling (config.py): kind ('none',
'llama3', 'yarn', 'longrope'), factor, original_max_len; llama3: low_freq_factor,
high_freq_factor; yarn: beta_fast, beta_slow, truncate, attention_factor (0: 0.1 ln(factor) +
1); longrope: short_factor, long_factor (one divisor per frequency: the long ones when the
call's positions reach past original_max_len, else the short ones), attention_factor (0:
sqrt(1 + ln(factor) / ln(original_max_len))).
"""
from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np


def _llama3(inv_freq, s):
  factor, low, high, original = (s['factor'], s['low_freq_factor'], s['high_freq_factor'],
                                 s['original_max_len'])
  wavelen = 2 * jnp.pi / inv_freq
  low_wavelen, high_wavelen = original / low, original / high
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (original / wavelen - low) / max(high - low, 1e-9)  # no band when high == low
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, scaled)


def _yarn(inv_freq, d: int, theta: float, s):
  """YaRN (arXiv:2309.00071): dims that turn fewer than beta_slow times over the original
  context are interpolated (frequency / factor), those turning more than beta_fast times are
  kept, a linear ramp blends the band between."""
  factor, original = s['factor'], s['original_max_len']

  def dim_of(turns):  # the dim whose wavelength fits `turns` times in the original context
    return d * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

  low, high = dim_of(s['beta_fast']), dim_of(s['beta_slow'])
  if s['truncate']:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, d - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  keep = jnp.asarray(1 - ramp)  # 1: extrapolate (the original frequency), 0: interpolate
  return inv_freq / factor * (1 - keep) + inv_freq * keep


def attention_factor(scaling) -> float:
  """What yarn and longrope multiply cos and sin by (so attention logits by its square); 1
  otherwise."""
  if not scaling or scaling['kind'] not in ('yarn', 'longrope'):
    return 1.0
  if scaling['attention_factor']:
    return float(scaling['attention_factor'])
  factor = scaling['factor']
  if factor <= 1:
    return 1.0
  if scaling['kind'] == 'yarn':
    return 0.1 * math.log(factor) + 1.0
  return math.sqrt(1 + math.log(factor) / math.log(scaling['original_max_len']))


def rope_frequencies(d: int, theta: float, scaling=None, long: Any = False):
  """The d/2 rotation frequencies [d/2] float32, stretched as `scaling` says (longrope: by
  its long factors where `long`, a possibly traced bool, else its short ones)."""
  inv_freq = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  kind = scaling['kind'] if scaling else 'none'
  if kind == 'llama3':
    return _llama3(inv_freq, scaling)
  if kind == 'yarn':
    return _yarn(inv_freq, d, theta, scaling)
  if kind == 'longrope':
    short = jnp.asarray(scaling['short_factor'], jnp.float32)
    return inv_freq / jnp.where(long, jnp.asarray(scaling['long_factor'], jnp.float32), short)
  return inv_freq


def apply_rope(x, positions, theta: float, scaling=None, rotary_dim: int = 0):
  """Rotate x [b, s, h, d] by positions [b, s] (the half-split convention of GPT-NeoX/Llama).

  Args:
    x: [b, s, h, d] queries or keys.
    positions: [b, s] absolute positions.
    theta: the base wavelength.
    scaling: model.rope_scaling (a mapping), or None.
    rotary_dim: rotate only the first rotary_dim dims (partial rotary), the rest pass through;
      0: all d.
  Returns:
    [b, s, h, d] in x's dtype.
  """
  r = rotary_dim or x.shape[-1]
  long = False
  if scaling and scaling['kind'] == 'longrope':  # as transformers: by the call's positions
    long = jnp.max(positions) + 1 > scaling['original_max_len']
  inv_freq = rope_frequencies(r, theta, scaling, long)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, s, r/2]
  mscale = attention_factor(scaling)
  cos = (jnp.cos(angles) * mscale)[:, :, None, :]
  sin = (jnp.sin(angles) * mscale)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf[..., :r], 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, xf[..., r:]], axis=-1)
  return out.astype(x.dtype)
