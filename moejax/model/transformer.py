"""Decoder-only transformer LM with a per-layer schedule (dense first, then MoE; linear-attention
layers where model.linear_pattern says; model/schedule.py).

Layers are grouped into at most three scanned stacks, so compile time does not grow with depth:
  prefix: `first_k_dense` dense blocks (in steps of the linear pattern's length P);
  body:   periods of lcm(P, moe_layer_freq) layers; without linear layers [MoE block, dense
          block x (freq - 1)];
  tail:   the leftover layers, a shorter period.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from moejax.model.attention import GroupedQueryAttention
from moejax.model.linear_attention import GatedDeltaNet
from moejax.model.mla import MultiHeadLatentAttention
from moejax.model.remat import rematted
from moejax.model.schedule import (has_moe, is_linear, layer_plan, pattern_length,
                                   period_blocks, period_length)
from moejax.moe.layer import MoEFFN
from moejax.nn import names
from moejax.nn.layers import SwiGLU, make_norm, param_with_axes


class Block(nn.Module):
  """One decoder block: x + attention (or, in a linear layer, Gated DeltaNet), then + FFN
  (dense SwiGLU or MoE), each sublayer with its norms where model.norm_placement says: 'pre'
  x + f(norm(x)), 'post' x + norm(f(x)), 'both' x + norm(f(norm(x))); the branch times
  model.residual_multiplier."""
  cfg: Any  # model config (FrozenConfigDict)
  moe: bool
  train: bool = True
  cache_len: int = 0
  linear: bool = False  # a linear-attention layer (model.linear_pattern)

  @nn.compact
  def __call__(self, x, positions, token_ids, layer, replay=None):
    """Args:
      x: [b, s, d] the residual stream.
      positions: [b, s] int32 absolute positions.
      token_ids: [b, s] int32 (hash routing routes by them).
      layer: this block's index in the model (traced inside a scanned stack).
      replay: [b * s, K] experts to route to instead of selecting (MoE blocks), or None.
    Returns:
      (x [b, s, d], aux: the MoE layer's losses and statistics, None for a dense block).
    """
    c = self.cfg
    dtype = jnp.dtype(c.dtype)
    pre, post = c.norm_placement in ('pre', 'both'), c.norm_placement in ('post', 'both')

    def sublayer(x, f, name):
      """x + residual_multiplier * [post-norm] f([pre-norm] x)."""
      h = make_norm(c.norm, c.norm_eps, dtype, f'{name}_norm')(x) if pre else x
      out = f(checkpoint_name(h, f'{name}_in'))
      if post:
        out = make_norm(c.norm, c.norm_eps, dtype, f'{name}_post_norm')(out)
      out = out * c.residual_multiplier if c.residual_multiplier != 1 else out
      return x + checkpoint_name(out, f'{name}_out')

    if self.linear:
      lin = c.linear
      attn = GatedDeltaNet(lin.num_key_heads, lin.num_value_heads, lin.key_head_dim,
                           lin.value_head_dim, lin.conv_kernel, c.norm_eps, lin.chunk, dtype,
                           self.cache_len, lin.decay, lin.gate_rank, lin.gate_fn, name='attn')
      x = sublayer(x, attn, 'attn')
    elif c.attention == 'mla':
      attn = MultiHeadLatentAttention(c.num_heads, c.mla, c.rope_theta, c.mla.latent_norm_eps,
                                      dtype, self.cache_len, name='attn')
      x = sublayer(x, lambda h: attn(h, positions), 'attn')
    else:
      attn = GroupedQueryAttention(
          c.num_heads, c.num_kv_heads, c.head_dim, c.rope_theta, dtype, self.cache_len,
          qk_norm=c.qk_norm, qk_norm_after_rope=c.qk_norm_after_rope, norm_eps=c.norm_eps,
          qkv_bias=c.qkv_bias,
          rope_scaling=c.rope_scaling if c.rope_scaling.kind != 'none' else None,
          rotary_dim=c.rotary_dim, chunk=c.attention_chunk,
          temperature=(c.nope_temperature, c.nope_temperature_floor),
          window=c.sliding_window, sinks=c.attention_sinks, out_bias=c.attention_out_bias,
          output_gate=c.attention_output_gate, scale=c.attention_scale, name='attn')
      x = sublayer(x, lambda h: attn(h, positions, rotated_layer(c, layer),
                                     sliding_layer(c, layer)), 'attn')
    aux = []

    def ffn(h):
      if not self.moe:
        return SwiGLU(c.ffn_dim, dtype, name=names.FFN)(h)
      f, moe_aux = MoEFFN(c.moe, c.d_model, dtype, c.vocab_size, name=names.MOE)(
          h, token_ids, self.train, replay, layer)
      aux.append(moe_aux)
      return f
    x = sublayer(x, ffn, 'ffn')
    return x, (aux[0] if aux else None)


def rotated_layer(c, layer):
  """Whether layer `layer` (an int, or traced) has rotary embedding: all but every
  model.nope_every-th layer (Llama 4's NoPE layers); with model.rope_layers='windowed', only
  the layers that attend within a window (no positions on the full-attention layers; without
  a window, every layer rotates, as in EXAONE 4)."""
  rotated = True if not c.nope_every else (layer + 1) % c.nope_every != 0
  if c.rope_layers == 'windowed' and c.sliding_window:
    return jnp.logical_and(rotated, sliding_layer(c, layer))
  return rotated


def sliding_layer(c, layer):
  """Whether layer `layer` (an int, or traced in a scanned stack) attends within
  model.sliding_window: its entry of model.sliding_pattern, repeated over the layers."""
  if not c.sliding_window:
    return False
  pattern = tuple(int(p) for p in c.sliding_pattern)
  if all(pattern):
    return True
  return jnp.asarray(pattern, bool)[layer % len(pattern)]


class Period(nn.Module):
  """`span` consecutive layers starting at a multiple of the linear pattern's length (without
  linear layers: one MoE block, then moe_layer_freq - 1 dense blocks); returns the aux of its
  MoE blocks, their leaves stacked on a leading axis in layer order."""
  cfg: Any
  span: int
  train: bool = True
  cache_len: int = 0

  @nn.compact
  def __call__(self, x, positions, token_ids, first_layer, replay=None):
    """replay: [MoE blocks, T, K] or None."""
    auxes = []
    for j, (name, moe, linear) in enumerate(period_blocks(self.cfg, self.span)):
      r = None if replay is None or not moe else replay[len(auxes)]
      x, aux = Block(self.cfg, moe, self.train, self.cache_len, linear, name=name)(
          x, positions, token_ids, first_layer + j, r)
      if moe:
        auxes.append(aux)
    # (jnp.stack: a Python 0 loss, without balance losses, becomes an array too)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *auxes)


class DenseStack(nn.Module):
  """The body of the scanned stack of the first_k_dense layers: one dense block, or a whole
  repeat of the linear pattern."""
  cfg: Any
  train: bool = True
  cache_len: int = 0

  @nn.compact
  def __call__(self, x, positions, token_ids, layer):
    step = pattern_length(self.cfg)
    for j in range(step):
      x, _ = Block(self.cfg, False, self.train, self.cache_len, is_linear(self.cfg, j),
                   name=names.dense_layer_block(j, step))(x, positions, token_ids,
                                                          layer * step + j)
    return x, None


def _scanned(cls, cfg, length: int, name: str, per_layer_input: bool = False, **kwargs):
  """nn.scan of cls over `length` layers: inputs (positions, token ids) broadcast, then the
  per-layer index (and, with per_layer_input, one more per-layer input)."""
  cls = rematted(cls, cfg)
  # 'moe_state' (the loss-free bias) and its 'bias_updates' are per layer like the params, and
  # so are 'losses' (a layer's own losses: the sparse-attention indexer's);
  # the router rng differs per layer too.
  axes = {'params': 0, 'moe_state': 0, 'bias_updates': 0, 'cache': 0, 'losses': 0}
  scan = nn.scan(cls, variable_axes=axes,
                 split_rngs={'params': True, 'router': True},
                 in_axes=(nn.broadcast, nn.broadcast, 0) + ((0,) if per_layer_input else ()),
                 length=length,
                 metadata_params={nn.PARTITION_NAME: 'layers'})
  return scan(cfg, name=name, **kwargs)


class Transformer(nn.Module):
  """tokens [b, s] -> (logits [b, s, vocab] float32, aux: per-MoE-layer stacked statistics).

  cache_len > 0 builds the decoding model: attention keeps a cache (collection 'cache') of that
  many positions, and `positions` must be the tokens' absolute positions.
  """
  cfg: Any
  train: bool = True
  cache_len: int = 0

  @nn.compact
  def __call__(self, tokens, positions=None, replay=None):
    """replay [num_moe_layers, T, K]: route every MoE layer as recorded in aux['expert_index']
    of an earlier pass (topk router)."""
    c = self.cfg
    if isinstance(c, ml_collections.ConfigDict):
      c = ml_collections.FrozenConfigDict(c)
    dtype = jnp.dtype(c.dtype)
    b, s = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    embedding = param_with_axes(self, 'embedding', (c.vocab_size, c.d_model), ('vocab', 'embed'),
                                nn.initializers.normal(stddev=1.0))
    x = embedding.astype(dtype)[tokens]  # [b, s, d]
    if c.embedding_multiplier != 1:
      x = x * c.embedding_multiplier
    x = nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))

    prefix, periods, tail = layer_plan(c)
    auxes = []
    length = period_length(c)
    per_period = sum(moe for _, moe, _ in period_blocks(c, length))
    step = pattern_length(c)
    if prefix:
      x, _ = _scanned(DenseStack, c, prefix // step, names.DENSE_STACK, train=self.train,
                      cache_len=self.cache_len)(x, positions, tokens,
                                                jnp.arange(prefix // step))
    if periods:
      period_replay = None if replay is None else replay[:periods * per_period].reshape(
          (periods, per_period) + replay.shape[1:])
      x, aux = _scanned(Period, c, periods, names.MOE_STACK, per_layer_input=True,
                        span=length, train=self.train, cache_len=self.cache_len)(
                            x, positions, tokens, prefix + length * jnp.arange(periods),
                            period_replay)
      # [periods, per_period, ...] -> [MoE layers of the periods, ...]
      auxes.append(jax.tree.map(lambda a: a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:]),
                                aux))
    if tail:
      tail_moe = sum(moe for _, moe, _ in period_blocks(c, tail))
      x, aux = rematted(Period, c)(c, span=tail, train=self.train,
                                    cache_len=self.cache_len, name=names.TAIL_STACK)(
          x, positions, tokens, prefix + length * periods,
          None if replay is None else replay[-tail_moe:])
      auxes.append(aux)  # each leaf [tail_moe, ...]

    head = None if c.tie_embeddings else param_with_axes(
        self, 'head', (c.d_model, c.vocab_size), ('embed', 'vocab'))
    head_bias = param_with_axes(self, 'head_bias', (c.vocab_size,), ('vocab',),
                                nn.initializers.zeros) if c.head_bias else None

    def output(h, norm_name):
      h = make_norm(c.norm, c.norm_eps, dtype, norm_name)(h)
      if c.tie_embeddings:
        out = jnp.einsum('bsd,vd->bsv', h.astype(jnp.float32), embedding) * c.d_model ** -0.5
      else:
        out = jnp.einsum('bsd,dv->bsv', h, head.astype(dtype)).astype(jnp.float32)
        if head_bias is not None:
          out = out + head_bias
      if c.logit_divisor != 1:
        out = out / c.logit_divisor
      return nn.with_logical_constraint(out, ('batch', 'length', 'vocab'))

    logits = output(x, 'final_norm')
    aux = concat_aux(auxes)
    if c.mtp.depth and self.train and not self.cache_len:
      aux['mtp_logits'], aux['mtp_moe_loss'] = self._mtp(c, x, tokens, positions, embedding,
                                                         output)
    return logits, aux

  def _mtp(self, c, h, tokens, positions, embedding, output):
    """DeepSeek-V3 multi-token prediction (training only). Depth k combines the previous
    depth's hidden state at position i with the embedding of token i + k (RMSNorm both,
    concatenate, project), runs one transformer block, and predicts token i + k + 1 through the
    shared output head. Returns the logits of each depth ([b, s - k, vocab]) and the weighted
    balance losses of their MoE blocks."""
    dtype = jnp.dtype(c.dtype)
    all_logits, moe_loss = [], jnp.zeros((), jnp.float32)
    moe = has_moe(c)  # the MTP block is MoE when the model's blocks are
    for k in range(1, c.mtp.depth + 1):
      s = tokens.shape[1] - k
      h_prev = make_norm(c.norm, c.norm_eps, dtype, f'mtp_{k}_hnorm')(h[:, :s])
      e = make_norm(c.norm, c.norm_eps, dtype, f'mtp_{k}_enorm')(
          embedding.astype(dtype)[tokens[:, k:]])
      proj = param_with_axes(self, f'mtp_{k}_proj', (2 * c.d_model, c.d_model), ('mlp', 'embed'))
      h = jnp.concatenate([h_prev, e], axis=-1) @ proj.astype(dtype)  # [b, s, d]
      h, aux = Block(c, moe, self.train, name=f'mtp_{k}_block')(
          h, positions[:, k:], tokens[:, k:], c.num_layers + k - 1)
      if aux is not None:
        moe_loss = moe_loss + aux['loss']
      all_logits.append(output(h, f'mtp_{k}_norm'))
    return tuple(all_logits), moe_loss


def concat_aux(auxes):
  """The stacks' aux trees (leaves [layers_i, ...]) joined along the layer axis."""
  if not auxes:
    return {}
  return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *auxes)
