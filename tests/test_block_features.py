"""Norms and multipliers of the decoder block on their own: LayerNorm against its formula, the
three norm placements and the residual multiplier against the block written out by hand, and
the embedding multiplier and logit divisor against the same model without them."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from moejax.model.attention import GroupedQueryAttention
from moejax.model.transformer import Block, Transformer
from moejax.nn.layers import LayerNorm, SwiGLU

from conftest import tiny_config


def _np_norm(x, p, kind, eps=1e-6):
  if kind == 'layer':
    x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * p['scale'] + p['bias']
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * p['scale']


def test_layer_norm_by_its_formula():
  x = jax.random.normal(jax.random.key(0), (3, 5)) * 4 + 2  # a mean RMSNorm would keep
  p = {'scale': jnp.arange(1.0, 6.0), 'bias': jnp.array([0.5, -1, 0, 2, 1])}
  got = LayerNorm(1e-5).apply({'params': p}, x)
  np.testing.assert_allclose(got, _np_norm(np.asarray(x), p, 'layer', 1e-5), rtol=1e-5,
                             atol=1e-6)


def _randomised(params, key):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [l + 0.3 * jax.random.normal(k, l.shape)
                                   for k, l in zip(keys, leaves)])


@pytest.mark.parametrize('placement,kind,mult', [('pre', 'rms', 1.0), ('post', 'rms', 1.0),
                                                 ('both', 'layer', 0.5), ('pre', 'layer', 2.0)])
def test_norm_placement_and_residual_multiplier(placement, kind, mult):
  """x + m * [post] f([pre] x) for attention then the FFN, with each norm where it belongs."""
  c = tiny_config().model
  c.norm_placement, c.norm, c.residual_multiplier = placement, kind, mult
  m = ml_collections.FrozenConfigDict(c)
  block = Block(m, moe=False)
  x = jax.random.normal(jax.random.key(1), (2, 6, 32))
  pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
  params = _randomised(nn.unbox(block.init(jax.random.key(2), x, pos, None, 0))['params'],
                       jax.random.key(3))
  names = {'pre': {'attn_norm', 'ffn_norm'}, 'post': {'attn_post_norm', 'ffn_post_norm'},
           'both': {'attn_norm', 'ffn_norm', 'attn_post_norm', 'ffn_post_norm'}}[placement]
  assert {k for k in params if 'norm' in k} == names
  got, _ = block.apply({'params': params}, x, pos, None, 0)

  # The reference in float64 (its sublayers run at float64 too), so the allowance is the
  # block's own float32 rounding: relative eps32 per operation, compounded over the sums of
  # at most ffn_dim terms, is below ffn_dim * eps32 of the output's scale.
  with jax.enable_x64(True):
    attn = GroupedQueryAttention(4, 2, 8, c.rope_theta, dtype=jnp.float64)
    ffn = SwiGLU(c.ffn_dim, dtype=jnp.float64)
    p64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), params)
    np_p = jax.tree.map(np.asarray, p64)

    def sub(h, f, name):
      if f'{name}_norm' in names:
        h = _np_norm(h, np_p[f'{name}_norm'], kind)
      out = np.asarray(f(jnp.asarray(h)))
      if f'{name}_post_norm' in names:
        out = _np_norm(out, np_p[f'{name}_post_norm'], kind)
      return out * mult

    h = np.asarray(x, np.float64)
    h = h + sub(h, lambda t: attn.apply({'params': p64['attn']}, t, pos), 'attn')
    h = h + sub(h, lambda t: ffn.apply({'params': p64['ffn']}, t), 'ffn')
  assert h.dtype == np.float64
  np.testing.assert_allclose(got, h, rtol=0,
                             atol=c.ffn_dim * np.finfo(np.float32).eps * np.abs(h).max())


def test_embedding_multiplier_and_logit_divisor():
  """The multiplier equals scaling the embedding table (the untied head unchanged); the
  divisor divides the logits and nothing else."""
  c = tiny_config().model
  tokens = jax.random.randint(jax.random.key(4), (2, 8), 0, 256)
  plain = Transformer(ml_collections.FrozenConfigDict(c), train=False)
  params = nn.unbox(jax.jit(plain.init)(jax.random.key(5), tokens))
  c.embedding_multiplier, c.logit_divisor = 3.0, 4.0
  scaled = Transformer(ml_collections.FrozenConfigDict(c), train=False)
  got, _ = jax.jit(scaled.apply)(params, tokens)
  p2 = jax.tree.map(lambda a: a, params)
  p2['params']['embedding'] = params['params']['embedding'] * 3.0
  apply = jax.jit(plain.apply)  # one program for both parameter sets
  want, _ = apply(p2, tokens)
  np.testing.assert_allclose(got, want / 4.0, rtol=1e-4, atol=1e-6)
  assert not np.allclose(got, apply(params, tokens)[0] / 4.0, atol=1e-3)
