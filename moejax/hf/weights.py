"""Where each moejax parameter comes from in a Hugging Face checkpoint, both ways.

moejax holds layers in scanned stacks (a leading layer axis; moejax/model/transformer.py):
`dense_layers/block` (the first_k_dense dense layers), `moe_layers/moe_block` and
`moe_layers/dense_block_J` (periods of moe_layer_freq layers), `tail_layers/...` (the leftover,
unstacked). `slots(cfg)` says, for every layer index, which stack, block and index it is.
Within a block, `block_tensors` pairs each parameter with its Hugging Face tensor and the
transform between the two layouts (PyTorch Linear weights are [out, in]; moejax's are [in, out],
attention split by head).
"""
from __future__ import annotations

import numpy as np

from moejax.model.transformer import layer_plan


def slots(m) -> list[tuple[tuple[str, str], int | None, bool]]:
  """Per layer: ((stack, block), index in the stack or None when unstacked, is MoE)."""
  prefix, periods, tail = layer_plan(m)
  out = [(('dense_layers', 'block'), i, False) for i in range(prefix)]
  for p in range(periods):
    out.append((('moe_layers', 'moe_block'), p, True))
    out += [(('moe_layers', f'dense_block_{j}'), p, False) for j in range(m.moe_layer_freq - 1)]
  if tail:
    out.append((('tail_layers', 'moe_block'), None, True))
    out += [(('tail_layers', f'dense_block_{j}'), None, False) for j in range(tail - 1)]
  return out


# (moejax path within the block, HF name within model.layers.N, to moejax, to HF); the
# transforms get the array and the model config.
def _heads(n_attr):
  def to_moejax(w, m):  # [H * hd, D] -> [D, H, hd]
    return w.reshape(getattr(m, n_attr), m.head_dim, -1).transpose(2, 0, 1)

  def to_hf(w, m):  # [D, H, hd] -> [H * hd, D]
    return w.transpose(1, 2, 0).reshape(-1, w.shape[0])
  return to_moejax, to_hf


def _out_to_moejax(w, m):  # o_proj [D, H * hd] -> [H, hd, D]
  return w.reshape(w.shape[0], m.num_heads, m.head_dim).transpose(1, 2, 0)


def _out_to_hf(w, m):  # [H, hd, D] -> [D, H * hd]
  return w.transpose(2, 0, 1).reshape(w.shape[2], -1)


def _t(w, m):
  return w.T


def _same(w, m):
  return w


ATTENTION = [
    (('attn', 'wq'), 'self_attn.q_proj.weight', *_heads('num_heads')),
    (('attn', 'wk'), 'self_attn.k_proj.weight', *_heads('num_kv_heads')),
    (('attn', 'wv'), 'self_attn.v_proj.weight', *_heads('num_kv_heads')),
    (('attn', 'wo'), 'self_attn.o_proj.weight', _out_to_moejax, _out_to_hf),
    (('attn_norm', 'scale'), 'input_layernorm.weight', _same, _same),
    (('ffn_norm', 'scale'), 'post_attention_layernorm.weight', _same, _same),
]
QK_NORM = [
    (('attn', 'q_norm', 'scale'), 'self_attn.q_norm.weight', _same, _same),
    (('attn', 'k_norm', 'scale'), 'self_attn.k_norm.weight', _same, _same),
]
DENSE_FFN = [
    (('ffn', 'wi_0'), 'mlp.gate_proj.weight', _t, _t),
    (('ffn', 'wi_1'), 'mlp.up_proj.weight', _t, _t),
    (('ffn', 'wo'), 'mlp.down_proj.weight', _t, _t),
]


def block_tensors(m, fam, moe: bool) -> list:
  """(path, HF name, to moejax, to HF, experts?) for one block; experts? marks [N, ...] leaves
  stacked from per-expert tensors (the HF name then holds {e})."""
  out = [(*t, False) for t in ATTENTION]
  if m.qk_norm != 'none':
    out += [(*t, False) for t in QK_NORM]
  if not moe:
    return out + [(*t, False) for t in DENSE_FFN]
  gate, up, down = fam.expert_names
  mod = fam.moe_module
  out.append((('moe', 'router', 'w'), f'{mod}.gate.weight', _t, _t, False))
  for leaf, proj in (('wi_0', gate), ('wi_1', up), ('wo', down)):
    out.append((('moe', 'experts', leaf), f'{mod}.experts.{{e}}.{proj}.weight', _t, _t, True))
  return out


TOP = [
    (('embedding',), 'model.embed_tokens.weight', _same, _same),
    (('final_norm', 'scale'), 'model.norm.weight', _same, _same),
    (('head',), 'lm_head.weight', _t, _t),
]


def leaves(m, fam):
  """Every moejax parameter: (full path, [(layer or None, index in stack or None)], HF name
  template, to moejax, to HF, experts?) where the list gives the layers a stacked leaf holds."""
  out = [(path, [(None, None)], name, a, b, False) for path, name, a, b in TOP]
  grouped = {}
  for layer, ((stack, block), index, moe) in enumerate(slots(m)):
    for path, name, a, b, per_expert in block_tensors(m, fam, moe):
      key = (stack, block) + path
      entry = grouped.setdefault(key, [key, [], name, a, b, per_expert])
      entry[1].append((layer, index))
  return out + [tuple(v) for v in grouped.values()]


def hf_name(template: str, layer, e=None) -> str:
  name = template if layer is None else f'model.layers.{layer}.{template}'
  return name if e is None else name.replace('{e}', str(e))


def assemble(reader, m, fam, path, layers, template, to_moejax, to_hf, per_expert, shape,
             dtype=np.float32) -> np.ndarray:
  """One moejax leaf of the given shape, filled one Hugging Face tensor at a time; a missing
  tensor or a shape that does not fit is one error line naming the tensor."""
  from moejax.config import ConfigError
  out = np.empty(shape, dtype)
  for layer, index in layers:
    target = out if index is None else out[index]
    one = target[0] if per_expert else target
    want = to_hf(one, m).shape  # views only: nothing is copied
    experts = range(m.moe.num_experts) if per_expert else [None]
    values = []
    for e in experts:
      name = hf_name(template, layer, e)
      if name not in reader:
        raise ConfigError(f'the checkpoint has no tensor {name!r} (needed for moejax '
                          f'{"/".join(path)})')
      if reader.shape(name) != tuple(want):
        raise ConfigError(f'tensor {name}: shape {list(reader.shape(name))}, but this config '
                          f'needs {list(want)}')
      values.append(to_moejax(np.asarray(reader.get(name), np.float32), m))
    target[...] = np.stack(values) if per_expert else values[0]
  return out
