"""Where each moejax parameter comes from in a Hugging Face checkpoint, both ways.

moejax holds layers in scanned stacks (a leading layer axis; moejax/model/transformer.py):
`dense_layers/block` (the first_k_dense dense layers), `moe_layers/moe_block` and
`moe_layers/dense_block_J` (periods of moe_layer_freq layers), `tail_layers/...` (the leftover,
unstacked). `schedule.slots(cfg)` says, for every layer, which stack, block and index it is.
Within a block, `block_tensors` pairs each parameter with its Hugging Face tensor and the
transform between the two layouts (PyTorch Linear weights are [out, in]; moejax's are [in, out],
attention split by head).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from moejax.model import schedule
from moejax.nn import names


# (moejax path within the block, HF name within model.layers.N, to moejax, to HF); the
# transforms get the array and the model config.
def _heads(n_attr, interleaved: bool = False):
  def order(m):  # the rotated dims (rotary_dim, or all) reordered, the rest kept
    r = m.rotary_dim or m.head_dim
    return np.concatenate([_rope_order(r, interleaved), np.arange(r, m.head_dim)])

  def to_moejax(w, m):  # [H * hd, D] -> [D, H, hd]
    return w.reshape(getattr(m, n_attr), m.head_dim, -1)[:, order(m)].transpose(2, 0, 1)

  def to_hf(w, m):  # [D, H, hd] -> [H * hd, D]
    out = np.empty_like(w.transpose(1, 2, 0))
    out[:, order(m)] = w.transpose(1, 2, 0)
    return out.reshape(-1, w.shape[0])
  return to_moejax, to_hf


def _out_to_moejax(w, m):  # o_proj [D, H * hd] -> [H, hd, D]
  return w.reshape(w.shape[0], m.num_heads, m.head_dim).transpose(1, 2, 0)


def _out_to_hf(w, m):  # [H, hd, D] -> [D, H * hd]
  return w.transpose(2, 0, 1).reshape(w.shape[2], -1)


def _t(w, m):
  return w.T


def _same(w, m):
  return w


def attention(interleaved: bool) -> list:
  return [
      (('attn', 'wq'), 'self_attn.q_proj.weight', *_heads('num_heads', interleaved)),
      (('attn', 'wk'), 'self_attn.k_proj.weight', *_heads('num_kv_heads', interleaved)),
      (('attn', 'wv'), 'self_attn.v_proj.weight', *_heads('num_kv_heads')),
      (('attn', 'wo'), 'self_attn.o_proj.weight', _out_to_moejax, _out_to_hf),
  ]


# Hugging Face's names of a block's norms, by placement (moejax's are {attn,ffn}_norm before
# a sublayer, {attn,ffn}_post_norm after it). In a pre-norm block post_attention_layernorm is
# the one before the FFN.
NORM_NAMES = {
    'pre': (('attn_norm', 'input_layernorm'), ('ffn_norm', 'post_attention_layernorm')),
    'post': (('attn_post_norm', 'post_attention_layernorm'),
             ('ffn_post_norm', 'post_feedforward_layernorm')),
    'both': (('attn_norm', 'input_layernorm'), ('attn_post_norm', 'post_attention_layernorm'),
             ('ffn_norm', 'pre_feedforward_layernorm'),
             ('ffn_post_norm', 'post_feedforward_layernorm')),
}


def _scale(fam):
  """A norm scale's transforms: the same, or (zero-centred checkpoints, whose norms compute
  x * (1 + w)) moejax's scale = w + 1."""
  if not fam.zero_centred_norms:
    return _same, _same
  return (lambda w, m: w + 1.0), (lambda w, m: w - 1.0)


def norm_tensors(moejax_name: str, hf_name: str, m, fam) -> list:
  """A norm's scale (and bias, for LayerNorm) and its tensors."""
  out = [((moejax_name, 'scale'), f'{hf_name}.weight', *_scale(fam))]
  if m.norm == 'layer':
    out.append(((moejax_name, 'bias'), f'{hf_name}.bias', _same, _same))
  return out


def block_norms(m, fam) -> list:
  return [t for ours, theirs in NORM_NAMES[m.norm_placement]
          for t in norm_tensors(ours, theirs, m, fam)]


def qk_norms(fam) -> list:
  """The q/k norms' scales, under the family's module names."""
  q, k = fam.qk_norm_names
  return [(('attn', 'q_norm', 'scale'), f'self_attn.{q}.weight', *_scale(fam)),
          (('attn', 'k_norm', 'scale'), f'self_attn.{k}.weight', *_scale(fam))]


def _bias_to_moejax(b, m):  # [H * hd] -> [H, hd]
  return b.reshape(-1, m.head_dim)


def _bias_to_hf(b, m):
  return b.reshape(-1)


QKV_BIAS = [
    (('attn', 'bq'), 'self_attn.q_proj.bias', _bias_to_moejax, _bias_to_hf),
    (('attn', 'bk'), 'self_attn.k_proj.bias', _bias_to_moejax, _bias_to_hf),
    (('attn', 'bv'), 'self_attn.v_proj.bias', _bias_to_moejax, _bias_to_hf),
]


def _rows(which: int, to_moejax):
  """The q (0), k (1) or v (2) rows of a fused [q; k; v] tensor, then `to_moejax`."""
  def part(w, m):
    sizes = np.array([m.num_heads, m.num_kv_heads, m.num_kv_heads]) * m.head_dim
    start = sizes[:which].sum()
    return to_moejax(w[start:start + sizes[which]], m)
  return part


def _head_part(which: int, to_moejax):
  """The query (0) or gate (1) rows of a [H * 2 * hd, D] tensor holding, per head, the query
  rows then the gate rows; then `to_moejax`."""
  def part(w, m):
    return to_moejax(w.reshape(m.num_heads, 2, m.head_dim, -1)[:, which].reshape(
        m.num_heads * m.head_dim, -1), m)
  return part


def _qkv(tensors: list, fam, kind: str) -> list:
  """The q, k and v tensors (the first three), as rows of the family's fused tensor when its
  checkpoints hold one (marked 'fused_rows': export joins them again, q, k, v in order)."""
  if not fam.fused_qkv:
    return [(*t, False) for t in tensors]
  fused = [(path, f'self_attn.{fam.fused_qkv}.{kind}', _rows(i, a), b, 'fused_rows')
           for i, (path, _, a, b) in enumerate(tensors[:3])]
  return fused + [(*t, False) for t in tensors[3:]]


def checkpoint_name(fam, name: str) -> str:
  """A tensor's name in the family's checkpoints (transformers' name, renamed as the family's
  own code names it: `fam.tensor_names`, in order)."""
  for theirs, ours in fam.tensor_names:
    name = name.replace(theirs, ours)
  return name


def dense_ffn(module: str) -> list:
  return [
      ((names.FFN, 'wi_0'), f'{module}.gate_proj.weight', _t, _t),
      ((names.FFN, 'wi_1'), f'{module}.up_proj.weight', _t, _t),
      ((names.FFN, 'wo'), f'{module}.down_proj.weight', _t, _t),
  ]


def _swap(w, m=None):  # [..., a, b] -> [..., b, a]
  return np.swapaxes(w, -1, -2)


def _bias_name(weight_name: str) -> str:
  """The bias next to a weight: x.weight -> x.bias, a stacked x -> x_bias."""
  return (weight_name.removesuffix('.weight') + '.bias' if weight_name.endswith('.weight')
          else weight_name + '_bias')


def _fused_part(which: int, interleaved: bool, turn=None):
  """A stacked gate_up tensor -> its gate (0) or up (1) part [N, ..., F] (after `turn`, which
  brings a [N, 2F, D] layout to [N, D, 2F]): the halves, or alternate columns when
  interleaved. The export joins the parts again (join_parts)."""
  def to_moejax(w, m):
    w = turn(w, m) if turn is not None else w
    if interleaved:
      return w[..., which::2]
    f = w.shape[-1] // 2
    return w[..., which * f:(which + 1) * f]
  return to_moejax


def join_parts(parts, fam, transposed: bool = False):
  """The gate and up parts [..., F] -> the family's fused tensor (inverse of _fused_part):
  [..., 2F], or [..., 2F, D] for Linear weights (`transposed`: marked 'fused_t')."""
  gate, up = (np.asarray(p, np.float32) for p in parts)
  if fam.gate_up == 'interleaved':
    out = np.stack([gate, up], axis=-1).reshape(gate.shape[:-1] + (2 * gate.shape[-1],))
  else:
    out = np.concatenate([gate, up], axis=-1)
  return _swap(out) if transposed else out


def _rope_order(rope: int, interleaved: bool):
  """Index order taking the rotary dims from Hugging Face's layout to moejax's half-split one
  (DeepSeek's rope_interleave pairs (x0, x1), (x2, x3), ...: evens first, then odds)."""
  return (np.concatenate([np.arange(0, rope, 2), np.arange(1, rope, 2)]) if interleaved
          else np.arange(rope))


def _mla_query(m, interleaved: bool):
  """q_b_proj / q_proj [H * (nope + rope), r] <-> [r, H, nope + rope], rope dims reordered."""
  nope, rope = m.mla.qk_nope_head_dim, m.mla.qk_rope_head_dim
  order = np.concatenate([np.arange(nope), nope + _rope_order(rope, interleaved)])

  def to_moejax(w, m):
    return w.reshape(m.num_heads, nope + rope, -1)[:, order].transpose(2, 0, 1)

  def to_hf(w, m):
    out = np.empty_like(w.transpose(1, 2, 0))
    out[:, order] = w.transpose(1, 2, 0)
    return out.reshape(-1, w.shape[0])
  return to_moejax, to_hf


def _mla_kv_a(m, interleaved: bool):
  """kv_a_proj_with_mqa [r + rope, D] <-> [D, r + rope], the rotary key's dims reordered."""
  r = m.mla.kv_lora_rank
  order = np.concatenate([np.arange(r), r + _rope_order(m.mla.qk_rope_head_dim, interleaved)])

  def to_moejax(w, m):
    return w[order].T

  def to_hf(w, m):
    out = np.empty_like(w.T)
    out[order] = w.T
    return out
  return to_moejax, to_hf


def _per_head():
  def to_moejax(w, m):  # [H * k, r] -> [r, H, k]
    return w.reshape(m.num_heads, -1, w.shape[-1]).transpose(2, 0, 1)

  def to_hf(w, m):
    return w.transpose(1, 2, 0).reshape(-1, w.shape[0])
  return to_moejax, to_hf


def _indexer(m, interleaved: bool) -> list:
  """The lightning indexer's tensors (self_attn.indexer), its rotary dims (the first
  qk_rope_head_dim of its queries and keys) reordered from interleaved pairs when the family's
  indexer rotates them so (its key's LayerNorm reordered alike: the scores stay the same)."""
  rope, d = m.mla.qk_rope_head_dim, m.mla.index_head_dim
  order = np.concatenate([_rope_order(rope, interleaved), np.arange(rope, d)])
  back = np.argsort(order)
  mod = 'self_attn.indexer'
  return [
      (('attn', 'indexer', 'wq'), f'{mod}.wq_b.weight',
       lambda w, m: w.reshape(m.mla.index_heads, d, -1)[:, order].transpose(2, 0, 1),
       lambda w, m: w[:, :, back].transpose(1, 2, 0).reshape(-1, w.shape[0])),
      (('attn', 'indexer', 'wk'), f'{mod}.wk.weight', lambda w, m: w[order].T,
       lambda w, m: w.T[back]),
      (('attn', 'indexer', 'k_norm', 'scale'), f'{mod}.k_norm.weight', lambda w, m: w[order],
       lambda w, m: w[back]),
      (('attn', 'indexer', 'k_norm', 'bias'), f'{mod}.k_norm.bias', lambda w, m: w[order],
       lambda w, m: w[back]),
      (('attn', 'indexer', 'w_heads'), f'{mod}.weights_proj.weight', _t, _t)]


def latent_attention(m, interleaved: bool) -> list:
  q = ([(('attn', 'wq_a'), 'self_attn.q_a_proj.weight', _t, _t),
        (('attn', 'q_norm', 'scale'), 'self_attn.q_a_layernorm.weight', _same, _same),
        (('attn', 'wq_b'), 'self_attn.q_b_proj.weight', *_mla_query(m, interleaved))]
       if m.mla.q_lora_rank else
       [(('attn', 'wq'), 'self_attn.q_proj.weight', *_mla_query(m, interleaved))])
  return q + [
      (('attn', 'wkv_a'), 'self_attn.kv_a_proj_with_mqa.weight', *_mla_kv_a(m, interleaved)),
      (('attn', 'kv_norm', 'scale'), 'self_attn.kv_a_layernorm.weight', _same, _same),
      (('attn', 'wkv_b'), 'self_attn.kv_b_proj.weight', *_per_head()),
      (('attn', 'wo'), 'self_attn.o_proj.weight', _out_to_moejax_latent, _out_to_hf_latent)]


def _out_to_moejax_latent(w, m):  # o_proj [D, H * v] -> [H, v, D]
  return w.reshape(w.shape[0], m.num_heads, m.mla.v_head_dim).transpose(1, 2, 0)


def _out_to_hf_latent(w, m):
  return w.transpose(2, 0, 1).reshape(w.shape[2], -1)


class Parts(NamedTuple):
  """One Hugging Face tensor holding several moejax leaves: split(w, m) -> the leaves' values in
  order, join(values, m) -> the tensor (export), shape(m) -> its shape."""
  split: Callable
  join: Callable
  shape: Callable


class Part(NamedTuple):
  """The leaf `index` of a Parts tensor (block_tensors' experts? column)."""
  parts: Parts
  index: int


def _parts(name: str, paths: list, parts: Parts) -> list:
  return [(path, name, lambda w, m, i=i: parts.split(w, m)[i], None, Part(parts, i))
          for i, path in enumerate(paths)]


def _linear_heads(m):
  """(hk, hv, dk, dv, r): key and value heads, their dims, value heads per key head."""
  lin = m.linear
  return (lin.num_key_heads, lin.num_value_heads, lin.key_head_dim, lin.value_head_dim,
          lin.num_value_heads // lin.num_key_heads)


def _in(w, heads):  # a Linear's rows [heads * k, D] -> [D, heads, k]
  return w.reshape(heads, -1, w.shape[-1]).transpose(2, 0, 1)


def _out(w):  # [D, heads, k] -> [heads * k, D]
  return w.transpose(1, 2, 0).reshape(-1, w.shape[0])


def _qkvz_per_key_head():
  """in_proj_qkvz [hk * (2 dk + 2 r dv), D], per key head [q dk | k dk | v r dv | z r dv]
  <-> wq, wk [D, hk, dk], wv, wz [D, hv, dv] (value head h serves key head h // r)."""
  def split(w, m):
    hk, hv, dk, dv, r = _linear_heads(m)
    g = w.reshape(hk, 2 * dk + 2 * r * dv, -1)
    parts = (g[:, :dk], g[:, dk:2 * dk], g[:, 2 * dk:2 * dk + r * dv], g[:, 2 * dk + r * dv:])
    return [_in(p.reshape(-1, w.shape[-1]), n) for p, n in zip(parts, (hk, hk, hv, hv))]

  def join(values, m):
    hk, _, _, _, _ = _linear_heads(m)
    rows = [_out(v).reshape(hk, -1, v.shape[0]) for v in values]
    return np.concatenate(rows, axis=1).reshape(-1, values[0].shape[0])

  def shape(m):
    hk, hv, dk, dv, _ = _linear_heads(m)
    return (2 * hk * dk + 2 * hv * dv, m.d_model)
  return Parts(split, join, shape)


def _ba_per_key_head():
  """in_proj_ba [2 hv, D], per key head [b r | a r] <-> wb, wa [D, hv]."""
  def split(w, m):
    hk, hv, _, _, r = _linear_heads(m)
    g = w.reshape(hk, 2 * r, -1)
    return [g[:, :r].reshape(hv, -1).T, g[:, r:].reshape(hv, -1).T]

  def join(values, m):
    hk, _, _, _, r = _linear_heads(m)
    return np.concatenate([v.T.reshape(hk, r, -1) for v in values], axis=1).reshape(
        -1, values[0].shape[0])
  return Parts(split, join, lambda m: (2 * m.linear.num_value_heads, m.d_model))


def _rows_of(heads_dims):
  """One Linear of [a; b; ...] row blocks, block i of heads_dims(m)[i] = (heads, dim) <-> its
  leaves [D, heads, dim] ([D, heads] where dim is None: one row per head)."""
  def split(w, m):
    blocks = heads_dims(m)
    sizes = np.cumsum([h * (k or 1) for h, k in blocks])[:-1]
    return [_in(p, h) if k else p.T for p, (h, k) in zip(np.split(w, sizes), blocks)]

  def join(values, m):
    return np.concatenate([_out(v) if v.ndim == 3 else v.T for v in values], axis=0)
  return Parts(split, join, lambda m: (sum(h * (k or 1) for h, k in heads_dims(m)), m.d_model))


def _conv():
  """conv1d [C, 1, K] over channels [q hk dk | k hk dk | v hv dv] <-> conv_q, conv_k [K, hk,
  dk], conv_v [K, hv, dv]."""
  def sizes(m):
    hk, hv, dk, dv, _ = _linear_heads(m)
    return ((hk, dk), (hk, dk), (hv, dv))

  def split(w, m):
    c = w[:, 0, :].T  # [K, C]
    cuts = np.cumsum([h * k for h, k in sizes(m)])[:-1]
    return [p.reshape(c.shape[0], h, k) for p, (h, k) in zip(np.split(c, cuts, axis=1),
                                                             sizes(m))]

  def join(values, m):
    return np.concatenate([v.reshape(v.shape[0], -1) for v in values], axis=1).T[:, None, :]
  return Parts(split, join, lambda m: (sum(h * k for h, k in sizes(m)), 1,
                                       m.linear.conv_kernel))


def _linear_out_to_moejax(w, m):  # out_proj [D, hv * dv] -> [hv, dv, D]
  return w.T.reshape(m.linear.num_value_heads, m.linear.value_head_dim, -1)


def _linear_out_to_hf(w, m):
  return w.reshape(-1, w.shape[-1]).T


def linear_attention(fam) -> list:
  """A Gated DeltaNet layer's tensors under linear_attn, in the family's layout: q, k, v and z
  fused per key head with b and a likewise ('per_key_head'), q, k, v in one projection and
  z, b, a apart ('split'), or all six in one ('fused': rows [q | k | v | z | b | a])."""
  mod = 'linear_attn'
  a = ('attn',)
  if fam.linear_layout == 'fused':
    def rows(m):
      hk, hv, dk, dv, _ = _linear_heads(m)
      return ((hk, dk), (hk, dk), (hv, dv), (hv, dv), (hv, None), (hv, None))
    out = _parts(f'{mod}.in_proj.weight', [a + (n,) for n in ('wq', 'wk', 'wv', 'wz', 'wb', 'wa')],
                 _rows_of(rows))
  elif fam.linear_layout == 'per_key_head':
    out = (_parts(f'{mod}.in_proj_qkvz.weight', [a + ('wq',), a + ('wk',), a + ('wv',),
                                                   a + ('wz',)], _qkvz_per_key_head()) +
           _parts(f'{mod}.in_proj_ba.weight', [a + ('wb',), a + ('wa',)], _ba_per_key_head()))
  else:
    def qkv(m):  # (heads, dim) of the q, k and v rows
      hk, hv, dk, dv, _ = _linear_heads(m)
      return ((hk, dk), (hk, dk), (hv, dv))
    out = (_parts(f'{mod}.in_proj_qkv.weight', [a + ('wq',), a + ('wk',), a + ('wv',)],
                  _rows_of(qkv)) +
           [(a + ('wz',), f'{mod}.in_proj_z.weight',
             lambda w, m: _in(w, m.linear.num_value_heads), lambda w, m: _out(w), False),
            (a + ('wb',), f'{mod}.in_proj_b.weight', _t, _t, False),
            (a + ('wa',), f'{mod}.in_proj_a.weight', _t, _t, False)])
  return out + _parts(f'{mod}.conv1d.weight', [a + ('conv_q',), a + ('conv_k',),
                                              a + ('conv_v',)], _conv()) + [
      (a + ('dt_bias',), f'{mod}.dt_bias', _same, _same, False),
      (a + ('a_log',), f'{mod}.A_log', _same, _same, False),
      (a + ('norm_scale',), f'{mod}.norm.weight', _same, _same, False),
      (a + ('wo',), f'{mod}.out_proj.weight', _linear_out_to_moejax, _linear_out_to_hf, False)]


def block_tensors(m, fam, moe: bool, interleaved: bool = False, linear: bool = False) -> list:
  """(path, HF name, to moejax, to HF, experts?) for one block (a linear-attention layer's when
  `linear`); experts? marks [N, ...] leaves stacked from per-expert tensors (the HF name then
  holds {e}), a string or a Part the leaves sharing one tensor. A path starting with
  'moe_state' is a state variable (the selection bias), not a parameter."""
  out = [(*t, False) for t in block_norms(m, fam)]
  if linear:
    return out + linear_attention(fam) + _ffn_tensors(m, fam, moe)
  return out + _attention_tensors(m, fam, interleaved) + _ffn_tensors(m, fam, moe)


def _attention_tensors(m, fam, interleaved: bool) -> list:
  """A softmax-attention layer's tensors (grouped-query or latent)."""
  if m.attention == 'mla':
    out = [(*t, False) for t in latent_attention(m, interleaved)]
    if m.mla.index_topk:
      out += [(*t, False) for t in _indexer(m, fam.index_rope_pairs == 'interleaved')]
  else:
    out = _qkv(attention(interleaved), fam, 'weight')
  if m.qk_norm in ('head', 'full'):  # 'l2' has no scale
    out += [(*t, False) for t in qk_norms(fam)]
  if m.qkv_bias:
    out += _qkv(QKV_BIAS, fam, 'bias')
  if m.attention_out_bias:
    out.append((('attn', 'bo'), 'self_attn.o_proj.bias', _same, _same, False))
  if m.attention_output_gate and fam.query_gate:  # per head: query rows, then gate rows
    out = [(path, name, _head_part(0, a), b, 'fused_heads') if path == ('attn', 'wq') else
           (path, name, a, b, kind) for path, name, a, b, kind in out]
    out.append((('attn', 'wg'), 'self_attn.q_proj.weight', _head_part(1, _heads('num_heads')[0]),
                _heads('num_heads')[1], 'fused_heads'))
  elif m.attention_output_gate:  # sigmoid(x @ wg) times each head's output, before o_proj
    out.append((('attn', 'wg'), 'self_attn.gate_proj.weight', *_heads('num_heads'), False))
  if m.attention_sinks:
    out.append((('attn', 'sinks'), 'self_attn.sinks', _same, _same, False))
  return out


def _ffn_tensors(m, fam, moe: bool) -> list:
  """A block's FFN tensors: the dense FFN, or the MoE block's router, experts and shared
  experts."""
  out = []
  if not moe:
    return out + [(*t, False) for t in dense_ffn(fam.dense_module)]
  gate, up, down = (f'{fam.moe_module}.{n}' for n in fam.expert_names)
  mod = fam.moe_module
  moe_, experts = names.MOE, names.EXPERTS
  router = f'{mod}.{fam.router}'
  out.append(((moe_, names.ROUTER, 'w'), f'{router}.weight', _t, _t, False))
  if m.moe.router.logit_bias:
    out.append(((moe_, names.ROUTER, 'b'), f'{router}.bias', _same, _same, False))
  biased = m.moe.experts.name == 'glu' and m.moe.experts.bias
  if fam.experts != 'per_expert':  # stacked tensors holding every expert (one for gate and up)
    linear = fam.experts == 'stacked_linear'  # [N, out, in] <-> [N, in, out]
    turn, kind = (_swap, 'fused_t') if linear else (_same, 'fused')
    inter = fam.gate_up == 'interleaved'
    out += [((moe_, experts, 'wi_0'), gate, _fused_part(0, inter, turn), _same, kind),
            ((moe_, experts, 'wi_1'), up, _fused_part(1, inter, turn), _same, kind),
            ((moe_, experts, 'wo'), down, turn, turn, False)]
    if biased:
      out += [((moe_, experts, 'bi_0'), _bias_name(gate), _fused_part(0, inter), _same, 'fused'),
              ((moe_, experts, 'bi_1'), _bias_name(up), _fused_part(1, inter), _same, 'fused'),
              ((moe_, experts, 'bo'), _bias_name(down), _same, _same, False)]
  else:
    for leaf, name in (('wi_0', gate), ('wi_1', up), ('wo', down)):
      out.append(((moe_, experts, leaf), name, _t, _t, True))
    if biased:
      for leaf, name in (('bi_0', gate), ('bi_1', up), ('bo', down)):
        out.append(((moe_, experts, leaf), _bias_name(name), _same, _same, True))
  shared = fam.shared_module if fam.shared_beside else f'{mod}.{fam.shared_module}'
  if m.moe.num_shared_experts and fam.shared_fused:  # [gate; up] rows of one Linear
    out += [((moe_, names.SHARED, 'wi_0'), f'{shared}.input_linear.weight',
             _fused_part(0, False, _t), _same, 'fused_t'),
            ((moe_, names.SHARED, 'wi_1'), f'{shared}.input_linear.weight',
             _fused_part(1, False, _t), _same, 'fused_t'),
            ((moe_, names.SHARED, 'wo'), f'{shared}.output_linear.weight', _t, _t, False)]
  elif m.moe.num_shared_experts:
    for leaf, proj in (('wi_0', 'gate_proj'), ('wi_1', 'up_proj'), ('wo', 'down_proj')):
      out.append(((moe_, names.SHARED, leaf), f'{shared}.{proj}.weight', _t, _t, False))
  if m.moe.shared_expert_gate:
    out.append(((moe_, 'shared_gate'), f'{mod}.shared_expert_gate.weight', _t, _t, False))
  if m.moe.balance.selection_bias or m.moe.balance.bias_update_rate > 0:
    where = (f'{mod}.{fam.selection_bias}' if fam.selection_bias else
             f'{router}.e_score_correction_bias')
    flat, row = ((lambda b, m: b.reshape(-1)), (lambda b, m: b.reshape(1, -1))) if (
        fam.selection_bias_2d) else (_same, _same)
    out.append((('moe_state', moe_, 'bias'), where, flat, row, False))
  return out


def top(m, fam) -> list:
  """The embedding, the final norm and the head."""
  return ([(('params', 'embedding'), 'model.embed_tokens.weight', _same, _same)] +
          [(('params',) + path, name, a, b) for path, name, a, b in
           norm_tensors('final_norm', 'model.norm', m, fam)] +
          [(('params', 'head'), 'lm_head.weight', _t, _t)] +
          ([(('params', 'head_bias'), 'lm_head.bias', _same, _same)] if m.head_bias else []))


def leaves(m, fam, interleaved: bool = False):
  """Every moejax variable: (full path from the collection, [(layer or None, index in stack or
  None)], HF name template, to moejax, to HF, experts?) where the list gives the layers a
  stacked leaf holds."""
  out = [(path, [(None, None)], name, a, b, False) for path, name, a, b in top(m, fam)]
  grouped = {}
  for layer, slot in enumerate(schedule.slots(m)):
    for path, name, a, b, per_expert in block_tensors(m, fam, slot.moe, interleaved,
                                                      slot.linear):
      collection, path = (('moe_state',), path[1:]) if path[0] == 'moe_state' else (
          ('params',), path)
      key = collection + (slot.stack, slot.block) + path
      entry = grouped.setdefault(key, [key, [], name, a, b, per_expert])
      entry[1].append((layer, slot.index))
  out += [tuple(v) for v in grouped.values()]
  out = [(path, layers, checkpoint_name(fam, name), a, b, kind)
         for path, layers, name, a, b, kind in out]
  for k in range(1, m.mtp.depth + 1):  # DeepSeek-V3's multi-token prediction: layer L + k - 1
    layer = m.num_layers + k - 1
    has_moe = schedule.has_moe(m)
    for path, name, a, b in MTP:
      out.append((('params', f'mtp_{k}_{path[0]}') + path[1:], [(layer, None)], name, a, b,
                  False))
    for path, name, a, b, per_expert in block_tensors(m, fam, has_moe, interleaved):
      collection, path = (('moe_state',), path[1:]) if path[0] == 'moe_state' else (
          ('params',), path)
      out.append((collection + (f'mtp_{k}_block',) + path, [(layer, None)], name, a, b,
                  per_expert))
  return out


def _eh_to_moejax(w, m):  # eh_proj [D, 2D] over [e | h] -> [2D, D] over [h ; e]
  d = w.shape[0]
  return np.concatenate([w[:, d:].T, w[:, :d].T], axis=0)


def _eh_to_hf(w, m):
  d = w.shape[1]
  return np.concatenate([w[d:].T, w[:d].T], axis=1)


# The MTP module's own tensors (DeepSeek-V3: h' = eh_proj([enorm(embed(t)); hnorm(h)])).
MTP = [
    (('hnorm', 'scale'), 'hnorm.weight', _same, _same),
    (('enorm', 'scale'), 'enorm.weight', _same, _same),
    (('proj',), 'eh_proj.weight', _eh_to_moejax, _eh_to_hf),
    (('norm', 'scale'), 'shared_head.norm.weight', _same, _same),
]


def hf_name(template: str, layer, e=None) -> str:
  name = template if layer is None else f'model.layers.{layer}.{template}'
  return name if e is None else name.replace('{e}', str(e))


def assemble(reader, m, fam, path, layers, template, to_moejax, to_hf, per_expert, shape,
             dtype=np.float32, index=None) -> np.ndarray:
  """One moejax leaf of the given shape, or its part `index` (a tuple of slices: the shard of
  one device, as jax.make_array_from_callback asks for it), filled one Hugging Face tensor at a
  time. Only the tensors of the layers and experts inside the part are read, so a host
  assembling its devices' shards reads (and holds) its share of the checkpoint plus one tensor.
  A missing tensor or a shape that does not fit is one error line naming the tensor."""
  from moejax.errors import ConfigError
  index = tuple(index or ()) + (slice(None),) * (len(shape) - len(index or ()))
  ranges = [range(*sl.indices(n)) for sl, n in zip(index, shape)]
  out = np.empty([len(r) for r in ranges], dtype)
  stacked = layers[0][1] is not None  # a leading axis over the layers of a scanned stack
  inner = ranges[1:] if stacked else ranges  # of one layer's leaf
  cut = tuple(slice(r.start, r.stop, r.step) for r in inner)
  full = tuple(shape[1:] if stacked else shape)  # one layer's leaf, uncut

  def read(name, want):
    if name not in reader:
      raise ConfigError(f'the checkpoint has no tensor {name!r} (needed for moejax '
                        f'{"/".join(path)})')
    if want is not None and reader.shape(name) != tuple(want):
      raise ConfigError(f'tensor {name}: shape {list(reader.shape(name))}, but this config '
                        f'needs {list(want)}')
    return to_moejax(np.asarray(reader.get(name), np.float32), m)

  want = None  # the HF shape of one (layer's, expert's) tensor
  fused = isinstance(per_expert, (str, Part))  # one tensor holds this leaf and its siblings
  if not fused:
    want = to_hf(np.broadcast_to(np.zeros((), np.float32), full[1:] if per_expert else full),
                 m).shape
  for layer, stack_index in layers:
    if stacked and stack_index not in ranges[0]:
      continue
    target = out[ranges[0].index(stack_index)] if stacked else out
    if fused:  # one stacked tensor holds this leaf and its siblings
      name = hf_name(template, layer)
      value = read(name, None)
      if value.shape != full:
        raise ConfigError(f'tensor {name}: shape {list(reader.shape(name))} does not fit this '
                          f'config ({"/".join(path)} is {list(full)})')
      target[...] = value[cut]
    elif per_expert:
      for i, e in enumerate(inner[0]):
        target[i] = read(hf_name(template, layer, e), want)[cut[1:]]
    else:
      target[...] = read(hf_name(template, layer), want)[cut]
  return out
