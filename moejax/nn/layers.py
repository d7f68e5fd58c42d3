"""Leaf building blocks that the model (model/) and the MoE pieces (moe/) both use:
parameters with logical axis names, activation constraints, RMSNorm, LayerNorm and the SwiGLU
FFN.
Parameters are float32; computation runs in `dtype`. Imports nothing from moejax.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

Dtype = Any
constrain = nn.with_logical_constraint


def param_with_axes(module: nn.Module, name: str, shape, axes, init=None):
  init = init or nn.initializers.normal(stddev=shape[0] ** -0.5 if len(shape) > 1 else 1.0)
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class RMSNorm(nn.Module):
  eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = param_with_axes(self, 'scale', (x.shape[-1],), ('norm',), nn.initializers.ones)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (xf * scale).astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm with a scale and a bias, statistics in float32."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = param_with_axes(self, 'scale', (x.shape[-1],), ('norm',), nn.initializers.ones)
    bias = param_with_axes(self, 'bias', (x.shape[-1],), ('norm',), nn.initializers.zeros)
    xf = x.astype(jnp.float32)
    xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (xf * scale + bias).astype(self.dtype)


NORMS = {'rms': RMSNorm, 'layer': LayerNorm}


def make_norm(kind: str, eps: float, dtype, name: str) -> nn.Module:
  """The model's norm (model.norm: 'rms' or 'layer') named `name`."""
  return NORMS[kind](eps, dtype, name=name)


class SwiGLU(nn.Module):
  """Dense FFN: wo(silu(x wi_0) * (x wi_1))."""
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    wi_0 = param_with_axes(self, 'wi_0', (d, self.hidden), ('embed', 'mlp'))
    wi_1 = param_with_axes(self, 'wi_1', (d, self.hidden), ('embed', 'mlp'))
    wo = param_with_axes(self, 'wo', (self.hidden, d), ('mlp', 'embed'))
    x = x.astype(self.dtype)
    h = jax.nn.silu(x @ wi_0.astype(self.dtype)) * (x @ wi_1.astype(self.dtype))
    h = checkpoint_name(constrain(h, ('batch', 'length', 'act_mlp')), 'ffn_hidden')
    return constrain(h @ wo.astype(self.dtype), ('batch', 'length', 'act_embed'))
