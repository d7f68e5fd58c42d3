"""FLOPs per token, read off the real model definition (jax.eval_shape, nothing allocated).

Forward FLOPs of one token, the PaLM / MaxText convention:
  2 x (the matmul weights the token uses)   every weight matrix of attention, the dense FFNs,
                                            the shared experts, the router, the output head and
                                            the multi-token-prediction modules (each runs the
                                            shared output head again), plus the routed
                                            experts' weights times E / N (E: the experts a token
                                            uses on average, its router's expected_experts);
                                            not the input embedding (a lookup) nor the norms;
  + per attention layer 2 x ctx x heads x (d_qk + d_v)   scores and the weighted sum over a
                                            context of ctx = seq_len positions (its chunk for
                                            chunked layers, its window for windowed ones); the
                                            full length, as PaLM counts it, not the causal half;
  + per linear-attention layer, its chunked gated delta rule per token and value head:
      2 c (2 dk + dv)   the chunk's key-key and query-key products and the intra-chunk read
                        (2 c (3 dk + dv) with a decay per key channel: each product weighed)
      + c (dk + dv)     the triangular solve (half a c x c matrix times dk + dv columns)
      + 6 dk dv         reading the state twice and writing it once
    (c: model.linear.chunk): linear in the context, not quadratic. Its short convolution is
    2 FLOPs per weight like a matmul;
  + with sparse attention (model.mla.index_topk), the indexer's 2 x ctx x H_I x (d_I + 1) (its
    head dot products, then the weighted sum of their ReLUs) while the attention reads
    min(ctx, index_topk) keys (every key in the warm-up).
Training is 3 x forward (the backward pass costs two forwards). `train_flops(config)` is that
times the tokens of the run (train.steps x train.batch_size x data.seq_len).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from moejax.model.schedule import is_linear
from moejax.model.transformer import Transformer, rotated_layer, sliding_layer
from moejax.moe.registry import ROUTERS
from moejax.nn import names


# Parameters that are added, not multiplied: norm scales and biases (stacked per layer or per
# expert, so not told apart by their rank), attention sinks and Gated DeltaNet's decay inputs.
NOT_MATMUL = ('scale', 'bias', 'bq', 'bk', 'bv', 'bo', 'bi_0', 'bi_1', 'b', 'head_bias', 'sinks',
              'norm_scale', 'dt_bias', 'a_log')


def expected_experts(model_cfg) -> float:
  """The routed experts a token uses on average (the router's declaration)."""
  return ROUTERS[model_cfg.moe.router.name].expected_experts(model_cfg.moe)


_WEIGHTS: dict = {}


def _matmul_weights(model_cfg) -> tuple[float, float]:
  """(matmul weights a token uses in the main model and MTP modules, of which routed)."""
  key = str(model_cfg)  # the runs of a ladder share a few models: each is read once
  if key not in _WEIGHTS:
    _WEIGHTS[key] = _read_matmul_weights(model_cfg)
  return _WEIGHTS[key]


def _read_matmul_weights(model_cfg) -> tuple[float, float]:
  model = Transformer(ml_collections.FrozenConfigDict(model_cfg))
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  share = expected_experts(model_cfg) / model_cfg.moe.num_experts
  used = routed = 0.0
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes['params']):
    keys = [getattr(p, 'key', None) for p in path]
    size = float(np.prod(leaf.shape))
    if keys[-1] == 'embedding':
      used += size if model_cfg.tie_embeddings else 0.0  # a lookup, unless it is the head too
    elif keys[-1] in NOT_MATMUL:
      continue
    elif names.EXPERTS in keys:
      used += size * share
      routed += size * share
    elif leaf.ndim >= 2:
      used += size  # weight matrices (stacked layers included)
    if keys[-1] == 'head' or (keys[-1] == 'embedding' and model_cfg.tie_embeddings):
      used += size * model_cfg.mtp.depth  # each MTP depth runs the shared head once more
  return used, routed


def _context(m, layer: int, seq_len: int) -> int:
  """The positions a token of layer `layer` attends over: its chunk on chunked (rotated)
  layers, its window on windowed ones, else the whole sequence."""
  ctx = seq_len
  if m.attention_chunk and rotated_layer(m, layer):
    ctx = min(ctx, m.attention_chunk)
  if bool(sliding_layer(m, layer)):
    ctx = min(ctx, m.sliding_window)
  return ctx


def _attention_per_layer(m, ctx: int, layer: int) -> float:
  """Forward FLOPs of one token's attention scores and weighted sum over ctx positions, or
  of its gated delta rule in a linear layer."""
  if layer < m.num_layers and is_linear(m, layer):  # (MTP blocks attend)
    lin = m.linear
    c, dk, dv = lin.chunk, lin.key_head_dim, lin.value_head_dim
    products = 3 if lin.decay == 'channel' else 2  # a decay per channel weighs each product
    return float(lin.num_value_heads * (2 * c * (products * dk + dv) + c * (dk + dv) +
                                        6 * dk * dv))
  index = 0.0
  if m.attention == 'mla':
    qk, v = m.mla.qk_nope_head_dim + m.mla.qk_rope_head_dim, m.mla.v_head_dim
    if m.mla.index_topk:  # the indexer scores every key, the attention reads the chosen ones
      index = 2.0 * ctx * m.mla.index_heads * (m.mla.index_head_dim + 1)
      ctx = ctx if m.mla.index_warmup else min(ctx, m.mla.index_topk)
  else:
    qk = v = m.head_dim
  return 2.0 * ctx * m.num_heads * (qk + v) + index


def flops_per_token(model_cfg, seq_len: int) -> dict:
  """{'forward', 'train' (3 x forward), 'matmul_weights', 'routed_weights', 'attention',
  'expected_experts'} of one token at this sequence length."""
  used, routed = _matmul_weights(model_cfg)
  m = model_cfg
  # The MTP blocks are numbered after the last layer (model/transformer.py).
  attention = sum(_attention_per_layer(m, _context(m, i, seq_len), i)
                  for i in range(m.num_layers + m.mtp.depth))
  forward = 2.0 * used + attention
  return {'forward': forward, 'train': 3.0 * forward, 'matmul_weights': used,
          'routed_weights': routed, 'attention': attention,
          'expected_experts': expected_experts(model_cfg)}


def train_flops(config) -> float:
  """Training FLOPs of a whole run: 3 x forward FLOPs per token x its tokens."""
  t = config.train
  tokens = t.steps * t.batch_size * config.data.seq_len
  return flops_per_token(config.model, config.data.seq_len)['train'] * tokens


# Dense bfloat16 peak TFLOP/s per chip, the figure model FLOPs utilisation (MFU) is quoted
# against (MaxText's convention), by a substring of jax's device_kind. From the vendors' data
# sheets: TPU v4 275, v5e 197, v5p 459, v6e (Trillium) 918; NVIDIA A100 312, H100 (SXM) 989,
# H200 989, B200 2250.
PEAK_TFLOPS = (('TPU v4', 275.0), ('TPU v5 lite', 197.0), ('TPU v5e', 197.0),
               ('TPU v5p', 459.0), ('TPU v5', 459.0), ('TPU v6 lite', 918.0),
               ('TPU v6e', 918.0), ('A100', 312.0), ('H100', 989.0), ('H200', 989.0),
               ('B200', 2250.0))


def peak_tflops(device_kind: str, override: float = 0.0) -> float:
  """The device's dense bf16 peak (TFLOP/s): `override` when set, else the table's; 0 when
  unknown (a CPU), which leaves MFU unreported."""
  if override:
    return float(override)
  for key, value in PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      return value
  return 0.0
