"""The vocabulary a Hugging Face family entry (families.py) is written in: how config.json keys
become moejax config fields and back. Import and export read the same entry.

- `Key`: one config.json key <-> one moejax field (with a default for an absent key, and value
  maps where the two spell a value differently).
- `Const`: a key every model of the family has at one value: export writes it, import refuses
  any other in one line naming the key and what moejax lacks.
- Rules (`Rope`, `Schedule`, `SlidingLayers`, ...): the few mappings that are not one key to one
  field (rotary scaling, which layers are MoE, per-layer attention kinds, routing methods), each
  written once and shared by the families that use them.

Every piece has `read(hf, where) -> {field: value}` and `write(m, hf)` (m: the model config,
hf: the config.json dict being written).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from moejax.errors import ConfigError

_REQUIRED = object()


def _get(m, field: str):
  """A dotted field under config.model (field names start with 'model.')."""
  node = m
  for part in field.split('.')[1:]:
    node = node[part]
  return node


@dataclasses.dataclass(frozen=True)
class Key:
  """config.json key `hf` <-> moejax field `field` (dotted, from 'model.'). `default`: the value
  of an absent (or null) key, or a function of the whole config.json; `to_moejax` / `to_hf`:
  value maps where the two spell a value differently; `aliases`: other names of the key
  (transformers saves some under a name of its own), read when `hf` is absent."""
  hf: str
  field: str
  default: Any = _REQUIRED
  to_moejax: Callable | None = None  # value -> field value
  to_hf: Callable | None = None  # (field value, model config) -> value
  aliases: tuple = ()

  def read(self, hf: dict, where: str) -> dict:
    value = next((hf[k] for k in (self.hf,) + self.aliases if hf.get(k) is not None), None)
    if value is None:
      if self.default is _REQUIRED:
        raise ConfigError(f'{where}: has no {self.hf!r}, which this family needs')
      value = self.default(hf) if callable(self.default) else self.default
    return {self.field: self.to_moejax(value) if self.to_moejax else value}

  def write(self, m, hf: dict) -> None:
    value = _get(m, self.field)
    for alias in self.aliases:
      hf.pop(alias, None)
    hf[self.hf] = self.to_hf(value, m) if self.to_hf else value


@dataclasses.dataclass(frozen=True)
class Const:
  """config.json key `hf` at `value` in every model of the family (`absent`: what a missing
  key means, by default the value itself); `missing` says what moejax lacks for another."""
  hf: str
  value: Any
  missing: str
  absent: Any = _REQUIRED

  def read(self, hf: dict, where: str) -> dict:
    got = hf.get(self.hf, self.value if self.absent is _REQUIRED else self.absent)
    if got != self.value:
      raise ConfigError(f'{where}: {self.hf}={got!r} is not supported ({self.missing}); '
                        f'this family is imported with {self.hf}={self.value!r}')
    return {}

  def write(self, m, hf: dict) -> None:
    hf[self.hf] = self.value


class Rope:
  """rope_parameters (or the older rope_scaling / rope_theta) and partial_rotary_factor <->
  model.rope_theta, model.rope_scaling ('default', 'llama3', 'yarn') and model.rotary_dim."""

  YARN = ('factor', 'beta_fast', 'beta_slow', 'truncate', 'attention_factor')

  def read(self, hf: dict, where: str) -> dict:
    rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
    kind = rope.get('rope_type', rope.get('type', 'default'))
    f = {'model.rope_theta': float(rope.get('rope_theta', hf.get('rope_theta', 10000.0))),
         'model.rope_scaling.kind': 'none'}
    partial = rope.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0)) or 1.0
    head_dim = hf.get('head_dim') or hf['hidden_size'] // hf['num_attention_heads']
    f['model.rotary_dim'] = 0 if partial == 1.0 else int(head_dim * partial)
    if kind == 'llama3':
      f.update({'model.rope_scaling.kind': 'llama3',
                'model.rope_scaling.factor': float(rope['factor']),
                'model.rope_scaling.low_freq_factor': float(rope['low_freq_factor']),
                'model.rope_scaling.high_freq_factor': float(rope['high_freq_factor']),
                'model.rope_scaling.original_max_len':
                    int(rope['original_max_position_embeddings'])})
    elif kind == 'yarn':
      for key in ('mscale', 'mscale_all_dim'):
        if rope.get(key):
          raise ConfigError(f'{where}: rope_parameters.{key}={rope[key]} is not supported '
                            '(yarn with an mscale ratio)')
      original = rope.get('original_max_position_embeddings') or hf['max_position_embeddings']
      f.update({'model.rope_scaling.kind': 'yarn',
                'model.rope_scaling.factor': float(rope['factor']),
                'model.rope_scaling.beta_fast': float(rope.get('beta_fast') or 32.0),
                'model.rope_scaling.beta_slow': float(rope.get('beta_slow') or 1.0),
                'model.rope_scaling.truncate': bool(rope.get('truncate', True)),
                'model.rope_scaling.attention_factor': float(rope.get('attention_factor') or 0),
                'model.rope_scaling.original_max_len': int(original)})
    elif kind == 'longrope':
      original = int(rope['original_max_position_embeddings'])
      short, long = rope.get('short_mscale'), rope.get('long_mscale')
      if short != long:
        raise ConfigError(f'{where}: rope_parameters short_mscale={short} and long_mscale={long} '
                          'differ; one attention factor for both lengths is supported')
      f.update({'model.rope_scaling.kind': 'longrope',
                'model.rope_scaling.factor': float(rope.get('factor') or
                                                   hf['max_position_embeddings'] / original),
                'model.rope_scaling.original_max_len': original,
                'model.rope_scaling.short_factor': tuple(float(v) for v in rope['short_factor']),
                'model.rope_scaling.long_factor': tuple(float(v) for v in rope['long_factor']),
                'model.rope_scaling.attention_factor':
                    float(short or rope.get('attention_factor') or 0)})
    elif kind != 'default':
      raise ConfigError(f'{where}: rope_type {kind!r} is not supported; the default rotation, '
                        "'llama3', 'yarn' and 'longrope' scaling are")
    return f

  def write(self, m, hf: dict) -> None:
    for key in ('rope_scaling', 'rope_theta', 'partial_rotary_factor'):
      hf.pop(key, None)
    rope = {'rope_theta': m.rope_theta, 'rope_type': 'default'}
    r = m.rope_scaling
    if r.kind == 'llama3':
      rope.update(rope_type='llama3', factor=r.factor, low_freq_factor=r.low_freq_factor,
                  high_freq_factor=r.high_freq_factor,
                  original_max_position_embeddings=r.original_max_len)
    elif r.kind == 'yarn':
      rope.update(rope_type='yarn', factor=r.factor, beta_fast=r.beta_fast,
                  beta_slow=r.beta_slow, truncate=r.truncate,
                  original_max_position_embeddings=r.original_max_len)
      if r.attention_factor:
        rope['attention_factor'] = r.attention_factor
    elif r.kind == 'longrope':
      from moejax.model.rope import attention_factor
      scale = attention_factor(r)
      rope.update(rope_type='longrope', factor=r.factor, short_factor=list(r.short_factor),
                  long_factor=list(r.long_factor), attention_factor=scale,
                  short_mscale=scale, long_mscale=scale,
                  original_max_position_embeddings=r.original_max_len)
    if m.rotary_dim:
      rope['partial_rotary_factor'] = m.rotary_dim / m.head_dim
    hf['rope_parameters'] = rope


def moe_layers(hf: dict) -> list[int]:
  """Indices of the layers whose FFN is MoE, from whichever keys the config.json has: each
  layer's kind (mlp_layer_types), a list (moe_layers), the dense ones first (num_dense_layers),
  a step (interleave_moe_layer_step; decoder_sparse_step with mlp_only_layers)
  or first-k-dense with a frequency (first_k_dense_replace, moe_layer_freq)."""
  n = hf['num_hidden_layers']
  if isinstance(hf.get('mlp_layer_types'), list):  # each layer's 'dense' or 'sparse'
    return [i for i, kind in enumerate(hf['mlp_layer_types']) if kind == 'sparse']
  if isinstance(hf.get('moe_layers'), list):
    return sorted(hf['moe_layers'])
  if 'moe_layer_start_index' in hf:  # every interval-th layer from start to end (-1: the last)
    start, end = hf['moe_layer_start_index'] or 0, hf.get('moe_layer_end_index', -1)
    end, step = n - 1 if end in (None, -1) else end, hf.get('moe_layer_interval') or 1
    return [i for i in range(n) if (i + 1) % step == 0 and start <= i <= end]
  if 'interleave_moe_layer_step' in hf:
    step = hf['interleave_moe_layer_step'] or 1
    return [i for i in range(n) if (i + 1) % step == 0]
  if 'num_dense_layers' in hf:  # the first ones dense, then every layer MoE
    return list(range(hf['num_dense_layers'] or 0, n))
  if 'first_k_dense_replace' in hf:
    first, freq = hf['first_k_dense_replace'] or 0, hf.get('moe_layer_freq') or 1
    return [i for i in range(n) if i >= first and (i - first) % freq == 0]
  step = hf.get('decoder_sparse_step', 1) or 1
  dense = set(hf.get('mlp_only_layers') or [])
  return [i for i in range(n) if i not in dense and (i + 1) % step == 0]


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Which layers are MoE <-> model.first_k_dense and model.moe_layer_freq. Import reads any
  of the spellings (moe_layers); export writes the family's: 'every' (all layers MoE, no key),
  'sparse_step' (decoder_sparse_step, mlp_only_layers), 'first_k_dense'
  (first_k_dense_replace, moe_layer_freq), 'layer_list' (moe_layers,
  interleave_moe_layer_step), 'mlp_layer_types' (each layer's 'dense' or 'sparse'),
  'num_dense_layers' (the first ones dense, the rest MoE) or
  'start_end_interval' (moe_layer_start_index,
  moe_layer_end_index, moe_layer_interval: layers i >= start with (i + 1) % interval == 0)."""
  style: str

  def read(self, hf: dict, where: str) -> dict:
    from moejax.model.schedule import moe_layer_ids
    import types
    want, n = moe_layers(hf), hf['num_hidden_layers']
    if not want:
      raise ConfigError(f'{where}: no layer is MoE; import a MoE model')
    for freq in range(1, n + 1):
      got = moe_layer_ids(types.SimpleNamespace(num_layers=n, first_k_dense=want[0],
                                                moe_layer_freq=freq))
      if got == want:
        return {'model.first_k_dense': want[0], 'model.moe_layer_freq': freq}
    raise ConfigError(f'{where}: MoE layers {want} follow no "first K dense, then every F-th" '
                      'schedule, which moejax layers are built from')

  def write(self, m, hf: dict) -> None:
    from moejax.model.schedule import moe_layer_ids
    ids = moe_layer_ids(m)
    if self.style == 'every':
      if ids != list(range(m.num_layers)):
        raise ConfigError(f'--model_type={hf["model_type"]}: has a MoE FFN in every layer, but '
                          f'this model has dense layers (first_k_dense={m.first_k_dense}, '
                          f'moe_layer_freq={m.moe_layer_freq})')
    elif self.style == 'sparse_step':
      hf.update(decoder_sparse_step=1,
                mlp_only_layers=[i for i in range(m.num_layers) if i not in ids])
    elif self.style == 'num_dense_layers':
      if ids != list(range(m.first_k_dense, m.num_layers)):
        raise ConfigError(f'--model_type={hf["model_type"]}: has MoE in every layer after the '
                          f'dense ones; this model has moe_layer_freq={m.moe_layer_freq}')
      hf['num_dense_layers'] = m.first_k_dense
    elif self.style == 'mlp_layer_types':
      hf['mlp_layer_types'] = ['sparse' if i in ids else 'dense' for i in range(m.num_layers)]
    elif self.style == 'first_k_dense':
      hf.update(first_k_dense_replace=m.first_k_dense, moe_layer_freq=m.moe_layer_freq)
    elif self.style == 'start_end_interval':
      if (ids[0] + 1) % m.moe_layer_freq:
        raise ConfigError(f'--model_type={hf["model_type"]}: puts MoE layers where (i + 1) is a '
                          f"multiple of the interval; this model's first MoE layer is "
                          f'{ids[0]} with moe_layer_freq={m.moe_layer_freq}')
      hf.update(moe_layer_start_index=ids[0], moe_layer_end_index=m.num_layers - 1,
                moe_layer_interval=m.moe_layer_freq)
    else:
      hf.update(moe_layers=ids, interleave_moe_layer_step=m.moe_layer_freq)


def _period(values: list):
  """The shortest pattern that, repeated, gives `values`, where a None entry may be anything
  (a layer the pattern does not apply to); such a place in the pattern is 0 if nothing fills it."""
  for p in range(1, len(values) + 1):
    pattern = [None] * p
    for i, v in enumerate(values):
      if v is None:
        continue
      if pattern[i % p] not in (None, v):
        break
      pattern[i % p] = v
    else:
      return [0 if v is None else v for v in pattern]
  return values


@dataclasses.dataclass(frozen=True)
class SlidingLayers:
  """sliding_window (with use_sliding_window, when the family has that switch) and, with
  `layer_types`, the per-layer list of 'sliding_attention' / 'full_attention' <->
  model.sliding_window and model.sliding_pattern (the list's repeating period). Without
  layer_types the window applies to every layer; a family that has them needs them."""
  layer_types: bool = False
  switch: str = ''  # the family's on/off key (Qwen: use_sliding_window), or ''

  def read(self, hf: dict, where: str) -> dict:
    window = hf.get('sliding_window') or 0
    if self.switch and not hf.get(self.switch, False):
      window = 0
    types = hf.get('layer_types') if self.layer_types else None
    if not window:
      return {'model.sliding_window': 0, 'model.sliding_pattern': (1,)}
    if not types and self.layer_types:  # transformers derives them, each family its way
      raise ConfigError(f'{where}: has sliding_window={window} but no layer_types; add '
                        'layer_types (each layer\'s "sliding_attention" or "full_attention") '
                        'to config.json')
    if not types:
      return {'model.sliding_window': int(window), 'model.sliding_pattern': (1,)}
    kinds = {'sliding_attention': 1, 'full_attention': 0, 'linear_attention': None}
    other = [t for t in types if t not in kinds]
    if other:
      raise ConfigError(f'{where}: layer_types has {other[0]!r} layers, which moejax does not '
                        'build (sliding_attention, full_attention and linear_attention are)')
    pattern = tuple(_period([kinds[t] for t in types]))
    if not any(pattern):  # a window no layer uses
      return {'model.sliding_window': 0, 'model.sliding_pattern': (1,)}
    return {'model.sliding_window': int(window), 'model.sliding_pattern': pattern}

  def write(self, m, hf: dict) -> None:
    hf['sliding_window'] = m.sliding_window or None
    if self.switch:
      hf[self.switch] = bool(m.sliding_window)
    if self.layer_types:
      pattern = m.sliding_pattern if m.sliding_window else (0,)
      hf['layer_types'] = ['sliding_attention' if pattern[i % len(pattern)] else
                           'full_attention' for i in range(m.num_layers)]
    else:
      hf.pop('layer_types', None)


@dataclasses.dataclass(frozen=True)
class LinearLayers:
  """layer_types ('linear_attention' / 'full_attention'; absent: every full_attention_interval-th
  layer full, as transformers fills them) and the linear_* keys <-> model.linear_pattern (the
  list's repeating period) and the Gated DeltaNet layers' settings (model.linear.*). With
  `windows`, the other layers are 'sliding_attention' or 'full_attention' as SlidingLayers
  (earlier in the entry) reads and writes them."""
  windows: bool = False
  KEYS = (('linear_num_key_heads', 'num_key_heads'), ('linear_num_value_heads', 'num_value_heads'),
          ('linear_key_head_dim', 'key_head_dim'), ('linear_value_head_dim', 'value_head_dim'),
          ('linear_conv_kernel_dim', 'conv_kernel'))

  def read(self, hf: dict, where: str) -> dict:
    n = hf['num_hidden_layers']
    types = hf.get('layer_types')
    if not types:
      every = hf.get('full_attention_interval') or 4
      types = ['full_attention' if (i + 1) % every == 0 else 'linear_attention'
               for i in range(n)]
    kinds = {'linear_attention': 1, 'full_attention': 0}
    if self.windows:
      kinds['sliding_attention'] = 0
    other = [t for t in types if t not in kinds]
    if other:
      raise ConfigError(f'{where}: layer_types has {other[0]!r} layers, which moejax does not '
                        'build here (linear_attention and full_attention are)')
    if len(types) != n:
      raise ConfigError(f'{where}: layer_types has {len(types)} entries for '
                        f'num_hidden_layers={n}; give one per layer')
    pattern = tuple(_period([kinds[t] for t in types]))
    if not any(pattern):
      return {'model.linear_pattern': ()}
    f = {'model.linear_pattern': pattern}
    for key, field in self.KEYS:
      if hf.get(key) is None:
        raise ConfigError(f'{where}: has linear_attention layers but no {key!r}')
      f[f'model.linear.{field}'] = int(hf[key])
    return f

  def write(self, m, hf: dict) -> None:
    pattern = m.linear_pattern if any(m.linear_pattern) else (0,)
    hf.pop('full_attention_interval', None)
    other = hf['layer_types'] if self.windows else ['full_attention'] * m.num_layers
    hf['layer_types'] = ['linear_attention' if pattern[i % len(pattern)] else other[i]
                         for i in range(m.num_layers)]
    for key, field in self.KEYS:
      hf[key] = m.linear[field]


class AttentionBias:
  """attention_bias <-> biases on all four attention projections (q, k, v and the output)."""

  def read(self, hf: dict, where: str) -> dict:
    on = bool(hf.get('attention_bias', False))
    return {'model.qkv_bias': on, 'model.attention_out_bias': on}

  def write(self, m, hf: dict) -> None:
    hf['attention_bias'] = bool(m.qkv_bias)


class MupInput:
  """mup_enabled <-> model.embedding_multiplier: the embeddings times sqrt(hidden_size) when on
  (muP's input scaling), else 1."""

  def read(self, hf: dict, where: str) -> dict:
    on = bool(hf.get('mup_enabled', False))
    return {'model.embedding_multiplier': float(hf['hidden_size']) ** 0.5 if on else 1.0}

  def write(self, m, hf: dict) -> None:
    hf['mup_enabled'] = m.embedding_multiplier != 1.0


@dataclasses.dataclass(frozen=True)
class SharedExpert:
  """`key` (0 or absent: none) <-> one shared expert of that width, behind a sigmoid gate when
  `gated` (Qwen2-MoE's) or added in full."""
  gated: bool = True
  key: str = 'shared_expert_intermediate_size'

  def read(self, hf: dict, where: str) -> dict:
    width = hf.get(self.key) or 0
    if not width:
      return {'model.moe.num_shared_experts': 0, 'model.moe.shared_expert_gate': False}
    return {'model.moe.num_shared_experts': 1, 'model.moe.shared_expert_ffn_dim': width,
            'model.moe.shared_expert_gate': self.gated}

  def write(self, m, hf: dict) -> None:
    moe = m.moe
    width = moe.shared_expert_ffn_dim or moe.expert_ffn_dim
    hf[self.key] = width if moe.num_shared_experts else 0


@dataclasses.dataclass(frozen=True)
class TopkMethod:
  """DeepSeek's routing keys: scoring_func, topk_method ('greedy', 'group_limited_greedy',
  'noaux_tc'), n_group / topk_group, aux_loss_alpha <-> the top-K router's score_fn and group
  limiting, the fixed selection bias of 'noaux_tc' (e_score_correction_bias) and the aux
  loss. `scoring` / `method`: the family's defaults (what its transformers model runs)."""
  scoring: str
  method: str

  def read(self, hf: dict, where: str) -> dict:
    scoring = hf.get('scoring_func') or self.scoring
    method = hf.get('topk_method') or self.method
    if scoring != self.scoring:
      raise ConfigError(f'{where}: scoring_func={scoring!r} is not supported (this family '
                        f'routes with {self.scoring!r})')
    f = {'model.moe.router.score_fn': scoring}
    groups, keep = hf.get('n_group') or 1, hf.get('topk_group') or 1
    if method not in ('greedy', 'group_limited_greedy', 'noaux_tc'):
      raise ConfigError(f'{where}: topk_method={method!r} is not supported')
    if method != 'greedy' and groups > 1:
      f.update({'model.moe.router.num_groups': groups, 'model.moe.router.topk_groups': keep,
                'model.moe.router.group_score': 'top2_sum' if method == 'noaux_tc' else 'max'})
    if method == 'noaux_tc':
      f.update({'model.moe.balance.selection_bias': True, 'model.moe.balance.aux_loss_weight': 0.})
    else:
      f['model.moe.balance.aux_loss_weight'] = float(hf.get('aux_loss_alpha') or 0.0)
    return f

  def write(self, m, hf: dict) -> None:
    from moejax.moe.routers.base import resolve_group_score
    r = m.moe.router
    groups = r.num_groups
    method = self.method if self.method == 'noaux_tc' else (
        'group_limited_greedy' if groups > 1 else 'greedy')
    hf.update(scoring_func=r.score_fn, topk_method=method, n_group=groups,
              topk_group=r.topk_groups if groups > 1 else 1)
    if groups > 1 and resolve_group_score(r.group_score, r.score_fn) != (
        'top2_sum' if method == 'noaux_tc' else 'max'):
      raise ConfigError(f'--model_type={hf["model_type"]}: groups are scored by '
                        f'{"the top-2 sum" if method == "noaux_tc" else "their best expert"} '
                        f'in this family; this model has group_score={r.group_score!r}')


class NopeLayers:
  """Llama 4's per-layer attention: no_rope_layers (0: NoPE) every no_rope_layer_interval-th
  layer, attention_chunk_size on the rotated layers (layer_types), and the NoPE layers'
  temperature tuning (attn_temperature_tuning, attn_scale, floor_scale) <-> model.nope_every,
  attention_chunk, nope_temperature, nope_temperature_floor."""

  def read(self, hf: dict, where: str) -> dict:
    n = hf['num_hidden_layers']
    rope = list(hf.get('no_rope_layers') or [1] * n)  # 1: rotated, 0: NoPE
    every = hf.get('no_rope_layer_interval') or 4
    if all(rope):
      every = 0
    elif rope != [int((i + 1) % every != 0) for i in range(n)]:
      raise ConfigError(f'{where}: no_rope_layers {rope} is not "every {every}th layer"')
    chunk = hf.get('attention_chunk_size') or 0
    types = hf.get('layer_types')
    if chunk and types and types != ['chunked_attention' if r else 'full_attention'
                                     for r in rope]:
      raise ConfigError(f'{where}: layer_types must be chunked exactly on the rotated layers')
    f = {'model.nope_every': every, 'model.attention_chunk': chunk}
    if hf.get('attn_temperature_tuning') and every:
      f['model.nope_temperature'] = float(hf.get('attn_scale', 0.1))
      f['model.nope_temperature_floor'] = int(hf.get('floor_scale', 8192))
    return f

  def write(self, m, hf: dict) -> None:
    rope = [int(not m.nope_every or (i + 1) % m.nope_every != 0) for i in range(m.num_layers)]
    hf.update(no_rope_layers=rope, no_rope_layer_interval=m.nope_every or 4,
              attention_chunk_size=m.attention_chunk or None,
              layer_types=[('chunked_attention' if r and m.attention_chunk else
                            'full_attention') for r in rope],
              attn_temperature_tuning=bool(m.nope_temperature), attn_scale=m.nope_temperature,
              floor_scale=m.nope_temperature_floor)


@dataclasses.dataclass(frozen=True)
class IndexedLayers:
  """DeepSeek Sparse Attention's keys (index_topk, index_n_heads, index_head_dim) <->
  model.mla.index_*; every layer indexed (layer_types 'indexed_attention'), and with
  `per_layer` (GLM-5's indexer_types) every layer running its own indexer ('full': a layer
  that reuses another's selection is refused)."""
  per_layer: str = ''  # the config.json key of each layer's indexer mode, if the family has it

  def read(self, hf: dict, where: str) -> dict:
    kinds = set(hf.get('layer_types') or ['indexed_attention'])
    if kinds != {'indexed_attention'}:
      raise ConfigError(f'{where}: layer_types {sorted(kinds)} is not supported (every layer is '
                        "'indexed_attention' in this family)")
    modes = set(hf.get(self.per_layer) or ['full']) if self.per_layer else {'full'}
    if modes != {'full'}:
      raise ConfigError(f"{where}: {self.per_layer} has {sorted(modes - {'full'})} layers (an "
                        "indexer's selection reused by later layers), which moejax does not "
                        "build; every layer 'full' is supported")
    return {'model.mla.index_topk': int(hf['index_topk']),
            'model.mla.index_heads': int(hf['index_n_heads']),
            'model.mla.index_head_dim': int(hf['index_head_dim'])}

  def write(self, m, hf: dict) -> None:
    if not m.mla.index_topk:
      raise ConfigError(f'--model_type={hf["model_type"]}: indexes every layer (DeepSeek Sparse '
                        'Attention); this model has model.mla.index_topk=0')
    hf.update(index_topk=m.mla.index_topk, index_n_heads=m.mla.index_heads,
              index_head_dim=m.mla.index_head_dim,
              layer_types=['indexed_attention'] * m.num_layers)
    if self.per_layer:
      hf[self.per_layer] = ['full'] * m.num_layers


class LatentHeads:
  """MLA's heads: model.head_dim is qk_nope_head_dim + qk_rope_head_dim and every head has its
  own keys (num_kv_heads = num_heads); config.json's head_dim is the rotary part."""
  UNCHECKED = ('model.head_dim', 'model.num_kv_heads')  # not read by MLA

  def read(self, hf: dict, where: str) -> dict:
    return {'model.head_dim': hf['qk_nope_head_dim'] + hf['qk_rope_head_dim'],
            'model.num_kv_heads': hf['num_attention_heads']}

  def write(self, m, hf: dict) -> None:
    hf.update(head_dim=m.mla.qk_rope_head_dim, num_key_value_heads=m.num_heads)
