"""Hugging Face MoE families: how each one's config.json becomes moejax config fields, and where
its tensors live. A family is data (names and switches), not code in the model: the model only
has general features (`qk_norm`, `norm_topk_prob`, dense layers by schedule, ...).
"""
from __future__ import annotations

import dataclasses

from moejax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Family:
  model_type: str
  moe_module: str  # the MoE block's module name under model.layers.N
  expert_names: tuple[str, str, str]  # (gate, up, down) projections of one expert
  qk_norm: str = 'none'  # moejax model.qk_norm
  always_norm_topk: bool = False  # renormalise the K weights whatever the config says
  z_loss_key: str = ''  # config key of a router z-loss coefficient, if the family has one
  qkv_bias_key: str = ''  # config key saying whether q/k/v projections have biases
  qkv_bias_default: bool = False
  shared_key: str = ''  # config key of the gated shared expert's width (0 or absent: none)
  shared_module: str = 'shared_expert'  # the shared expert's module name in the MoE block
  latent_attention: bool = False  # MLA (q_a/q_b/kv_a/kv_b projections)
  router_name: str = 'gate'  # the router's module name in the MoE block
  dense_module: str = 'mlp'  # a dense layer's FFN module name
  fused_experts: bool = False  # experts stored stacked: gate_up_proj [N, D, 2F], down_proj
  interleaved_rope: bool = False  # q/k rotary dims in interleaved pairs (reordered at import)


FAMILIES = {f.model_type: f for f in (
    Family('mixtral', 'block_sparse_moe', ('w1', 'w3', 'w2'), always_norm_topk=True),
    Family('qwen3_moe', 'mlp', ('gate_proj', 'up_proj', 'down_proj'), qk_norm='head'),
    Family('olmoe', 'mlp', ('gate_proj', 'up_proj', 'down_proj'), qk_norm='full',
           z_loss_key='router_z_loss_coef'),
    Family('qwen2_moe', 'mlp', ('gate_proj', 'up_proj', 'down_proj'), qkv_bias_key='qkv_bias',
           qkv_bias_default=True, shared_key='shared_expert_intermediate_size'),
    Family('deepseek_v2', 'mlp', ('gate_proj', 'up_proj', 'down_proj'),
           shared_module='shared_experts', latent_attention=True),
    Family('deepseek_v3', 'mlp', ('gate_proj', 'up_proj', 'down_proj'),
           shared_module='shared_experts', latent_attention=True),
    Family('llama4_text', 'feed_forward', ('gate_up_proj', 'gate_up_proj', 'down_proj'),
           router_name='router', dense_module='feed_forward', fused_experts=True,
           interleaved_rope=True),
)}


def family(hf: dict, where: str) -> Family:
  kind = hf.get('model_type', '')
  if kind not in FAMILIES:
    raise ConfigError(f'{where}: model_type {kind!r} is not supported; supported: '
                      f'{", ".join(sorted(FAMILIES))}')
  return FAMILIES[kind]


def _rope(hf: dict, where: str) -> dict:
  rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  kind = rope.get('rope_type', rope.get('type', 'default'))
  f = {'model.rope_theta': float(rope.get('rope_theta', hf.get('rope_theta', 10000.0)))}
  if kind == 'llama3':
    f.update({'model.rope_scaling.kind': 'llama3',
              'model.rope_scaling.factor': float(rope['factor']),
              'model.rope_scaling.low_freq_factor': float(rope['low_freq_factor']),
              'model.rope_scaling.high_freq_factor': float(rope['high_freq_factor']),
              'model.rope_scaling.original_max_len': int(rope['original_max_position_embeddings'])})
  elif kind != 'default':
    raise ConfigError(f'{where}: rope_type {kind!r} is not supported; only the default rotation '
                      "and 'llama3' scaling")
  return f


def moe_layers(hf: dict) -> list[int]:
  """Indices of the layers whose FFN is MoE: Qwen's decoder_sparse_step and mlp_only_layers,
  DeepSeek's first_k_dense_replace and moe_layer_freq."""
  n = hf['num_hidden_layers']
  if 'moe_layers' in hf and isinstance(hf['moe_layers'], list):  # Llama 4 lists them
    return sorted(hf['moe_layers'])
  if 'interleave_moe_layer_step' in hf:
    step = hf['interleave_moe_layer_step'] or 1
    return [i for i in range(n) if (i + 1) % step == 0]
  if 'first_k_dense_replace' in hf:
    first, freq = hf['first_k_dense_replace'] or 0, hf.get('moe_layer_freq') or 1
    return [i for i in range(n) if i >= first and (i - first) % freq == 0]
  step = hf.get('decoder_sparse_step', 1) or 1
  dense = set(hf.get('mlp_only_layers') or [])
  return [i for i in range(n) if i not in dense and (i + 1) % step == 0]


def schedule(hf: dict, where: str) -> tuple[int, int]:
  """(first_k_dense, moe_layer_freq) giving the family's MoE layers, or a one-line refusal."""
  from moejax.model.schedule import moe_layer_ids
  import types
  want, n = moe_layers(hf), hf['num_hidden_layers']
  if not want:
    raise ConfigError(f'{where}: no layer is MoE; import a MoE model')
  for freq in range(1, n + 1):
    first = want[0]
    got = moe_layer_ids(types.SimpleNamespace(num_layers=n, first_k_dense=first,
                                              moe_layer_freq=freq))
    if got == want:
      return first, freq
  raise ConfigError(f'{where}: MoE layers {want} follow no "first K dense, then every F-th" '
                    'schedule, which moejax layers are built from')


def model_fields(hf: dict, where: str) -> dict:
  """The moejax config fields (dotted, under config.) of a Hugging Face config.json."""
  fam = family(hf, where)
  for key, ok in (('hidden_act', 'silu'),):
    if hf.get(key, ok) != ok:
      raise ConfigError(f'{where}: {key}={hf[key]!r} is not supported (only {ok!r})')
  qkv_bias = bool(hf.get(fam.qkv_bias_key, fam.qkv_bias_default)) if fam.qkv_bias_key else False
  if hf.get('attention_bias'):
    raise ConfigError(f'{where}: attention_bias=true is not supported (biased q/k/v projections)')
  if hf.get('clip_qkv') is not None:
    raise ConfigError(f'{where}: clip_qkv={hf["clip_qkv"]} is not supported')
  if hf.get('sliding_window') and hf.get('use_sliding_window', True):
    raise ConfigError(f'{where}: sliding_window={hf["sliding_window"]} (sliding-window '
                      'attention) is not supported')
  heads, d = hf['num_attention_heads'], hf['hidden_size']
  experts = hf.get('num_local_experts') or hf.get('num_experts') or hf.get('n_routed_experts')
  first, freq = schedule(hf, where)
  expert_width = hf.get('moe_intermediate_size') or hf['intermediate_size']
  f = {
      'model.vocab_size': hf['vocab_size'], 'model.d_model': d,
      'model.num_layers': hf['num_hidden_layers'], 'model.num_heads': heads,
      'model.num_kv_heads': hf.get('num_key_value_heads') or heads,
      'model.head_dim': hf.get('head_dim') or d // heads,
      'model.ffn_dim': hf['intermediate_size'],
      'model.max_seq_len': hf.get('max_position_embeddings', 4096),
      **_rope(hf, where),
      'model.norm_eps': hf.get('rms_norm_eps', 1e-6),
      'model.qk_norm': fam.qk_norm,
      'model.first_k_dense': first, 'model.moe_layer_freq': freq,
      'model.moe.num_experts': experts,
      'model.moe.num_experts_per_tok': hf['num_experts_per_tok'],
      'model.moe.expert_ffn_dim': expert_width,
      'model.qkv_bias': qkv_bias,
      'model.moe.num_shared_experts': 0,
      'model.moe.router.score_fn': 'softmax',
      'model.moe.router.norm_topk_prob': bool(fam.always_norm_topk or hf.get('norm_topk_prob')),
      'model.moe.dispatch.name': 'dropless',
      'model.moe.balance.aux_loss_weight': float(hf.get('router_aux_loss_coef') or 0.0),
      'model.moe.balance.z_loss_weight': float(hf.get(fam.z_loss_key) or 0.0)
      if fam.z_loss_key else 0.0,
  }
  shared = hf.get(fam.shared_key) if fam.shared_key else 0
  if shared:
    f.update({'model.moe.num_shared_experts': 1, 'model.moe.shared_expert_ffn_dim': shared,
              'model.moe.shared_expert_gate': True})
  if fam.latent_attention:
    f.update(_latent(hf, where))
  if fam.model_type == 'llama4_text':
    f.update(_llama4(hf, where))
  if hf.get('router_jitter_noise'):
    f['model.moe.router.jitter'] = float(hf['router_jitter_noise'])
  return f


def rope_interleaved(hf: dict) -> bool:
  """Whether the checkpoint's rotary dims are interleaved pairs (DeepSeek-V2 and Llama 4
  always; V3 unless rope_interleave is false) rather than moejax's halves; import reorders
  them."""
  kind = hf.get('model_type')
  return (kind in ('deepseek_v2', 'llama4_text') or
          (kind == 'deepseek_v3' and hf.get('rope_interleave', True)))


def _latent(hf: dict, where: str) -> dict:
  """DeepSeek-V2/V3: MLA, the shared experts, and routing (softmax or sigmoid, greedy or
  group-limited, scaled; V3's e_score_correction_bias as a fixed selection bias)."""
  nope, rope = hf['qk_nope_head_dim'], hf['qk_rope_head_dim']
  f = {'model.attention': 'mla', 'model.head_dim': nope + rope, 'model.num_kv_heads':
       hf['num_attention_heads'],
       'model.mla.q_lora_rank': hf.get('q_lora_rank') or 0,
       'model.mla.kv_lora_rank': hf['kv_lora_rank'], 'model.mla.qk_nope_head_dim': nope,
       'model.mla.qk_rope_head_dim': rope, 'model.mla.v_head_dim': hf['v_head_dim'],
       'model.moe.num_shared_experts': hf.get('n_shared_experts') or 0,
       'model.moe.router.routed_scaling_factor': float(hf.get('routed_scaling_factor') or 1.0),
       'model.moe.router.norm_topk_prob': bool(hf.get('norm_topk_prob'))}
  v3 = hf['model_type'] == 'deepseek_v3'
  if not v3:  # DeepSeek-V2's router never renormalises its top-K weights
    f['model.moe.router.norm_topk_prob'] = False
  if hf.get('mlp_bias'):
    raise ConfigError(f'{where}: mlp_bias=true is not supported')
  scoring = hf.get('scoring_func') or ('sigmoid' if v3 else 'softmax')
  method = hf.get('topk_method') or ('noaux_tc' if v3 else 'greedy')
  if scoring not in ('sigmoid', 'softmax'):
    raise ConfigError(f'{where}: scoring_func={scoring!r} is not supported')
  f['model.moe.router.score_fn'] = scoring
  groups, keep = hf.get('n_group') or 1, hf.get('topk_group') or 1
  if method in ('group_limited_greedy', 'noaux_tc') and groups > 1:
    f.update({'model.moe.router.num_groups': groups, 'model.moe.router.topk_groups': keep,
              'model.moe.router.group_score': 'top2_sum' if method == 'noaux_tc' else 'max'})
  elif method not in ('greedy', 'group_limited_greedy', 'noaux_tc'):
    raise ConfigError(f'{where}: topk_method={method!r} is not supported')
  if method == 'noaux_tc':
    f['model.moe.balance.selection_bias'] = True
    f['model.moe.balance.aux_loss_weight'] = 0.0
  else:
    f['model.moe.balance.aux_loss_weight'] = float(hf.get('aux_loss_alpha') or 0.0)
  return f


def _llama4(hf: dict, where: str) -> dict:
  """Llama 4 (text): top-1 sigmoid router gating the expert's input, one shared expert of the
  routed width, dense layers of their own width; NoPE every k-th layer (full attention,
  temperature-tuned queries), the other layers rotated, chunked and L2-normalised."""
  n = hf['num_hidden_layers']
  f = {'model.ffn_dim': hf.get('intermediate_size_mlp') or hf['intermediate_size'],
       'model.moe.num_shared_experts': 1, 'model.moe.router.score_fn': 'sigmoid',
       'model.moe.router.norm_topk_prob': False, 'model.moe.gate_input': True,
       'model.qk_norm': 'l2' if hf.get('use_qk_norm') else 'none'}
  rope = list(hf.get('no_rope_layers') or [1] * n)  # 1: rotated, 0: NoPE
  every = hf.get('no_rope_layer_interval') or 4
  if all(rope):
    every = 0
  elif rope != [int((i + 1) % every != 0) for i in range(n)]:
    raise ConfigError(f'{where}: no_rope_layers {rope} is not "every {every}th layer"')
  f['model.nope_every'] = every
  chunk = hf.get('attention_chunk_size') or 0
  types = hf.get('layer_types')
  if chunk and types and types != ['chunked_attention' if r else 'full_attention' for r in rope]:
    raise ConfigError(f'{where}: layer_types must be chunked exactly on the rotated layers')
  f['model.attention_chunk'] = chunk
  if hf.get('attn_temperature_tuning') and every:
    f['model.nope_temperature'] = float(hf.get('attn_scale', 0.1))
    f['model.nope_temperature_floor'] = int(hf.get('floor_scale', 8192))
  return f
