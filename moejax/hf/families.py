"""Hugging Face MoE families: how each one's config.json becomes moejax config fields, and where
its tensors live. A family is data (names and switches), not code in the model: the model only
has general features (`qk_norm`, `norm_topk_prob`, dense layers by schedule, ...).
"""
from __future__ import annotations

import dataclasses

from moejax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Family:
  model_type: str
  moe_module: str  # the MoE block's module name under model.layers.N
  expert_names: tuple[str, str, str]  # (gate, up, down) projections of one expert
  qk_norm: str = 'none'  # moejax model.qk_norm
  always_norm_topk: bool = False  # renormalise the K weights whatever the config says
  z_loss_key: str = ''  # config key of a router z-loss coefficient, if the family has one


FAMILIES = {f.model_type: f for f in (
    Family('mixtral', 'block_sparse_moe', ('w1', 'w3', 'w2'), always_norm_topk=True),
    Family('qwen3_moe', 'mlp', ('gate_proj', 'up_proj', 'down_proj'), qk_norm='head'),
    Family('olmoe', 'mlp', ('gate_proj', 'up_proj', 'down_proj'), qk_norm='full',
           z_loss_key='router_z_loss_coef'),
)}


def family(hf: dict, where: str) -> Family:
  kind = hf.get('model_type', '')
  if kind not in FAMILIES:
    raise ConfigError(f'{where}: model_type {kind!r} is not supported; supported: '
                      f'{", ".join(sorted(FAMILIES))}')
  return FAMILIES[kind]


def _rope_theta(hf: dict, where: str) -> float:
  rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  kind = rope.get('rope_type', rope.get('type', 'default'))
  if kind != 'default':
    raise ConfigError(f'{where}: rope_type {kind!r} (scaled rotary embeddings) is not supported; '
                      'only the default rotation')
  return float(rope.get('rope_theta', hf.get('rope_theta', 10000.0)))


def moe_layers(hf: dict) -> list[int]:
  """Indices of the layers whose FFN is MoE (Qwen's decoder_sparse_step and mlp_only_layers)."""
  n, step = hf['num_hidden_layers'], hf.get('decoder_sparse_step', 1) or 1
  dense = set(hf.get('mlp_only_layers') or [])
  return [i for i in range(n) if i not in dense and (i + 1) % step == 0]


def schedule(hf: dict, where: str) -> tuple[int, int]:
  """(first_k_dense, moe_layer_freq) giving the family's MoE layers, or a one-line refusal."""
  from moejax.config import moe_layer_ids
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
  if hf.get('attention_bias'):
    raise ConfigError(f'{where}: attention_bias=true is not supported (biased q/k/v projections)')
  if hf.get('clip_qkv') is not None:
    raise ConfigError(f'{where}: clip_qkv={hf["clip_qkv"]} is not supported')
  if hf.get('sliding_window') and hf.get('use_sliding_window', True):
    raise ConfigError(f'{where}: sliding_window={hf["sliding_window"]} (sliding-window '
                      'attention) is not supported')
  heads, d = hf['num_attention_heads'], hf['hidden_size']
  experts = hf.get('num_local_experts') or hf.get('num_experts')
  first, freq = schedule(hf, where)
  expert_width = hf.get('moe_intermediate_size') or hf['intermediate_size']
  f = {
      'model.vocab_size': hf['vocab_size'], 'model.d_model': d,
      'model.num_layers': hf['num_hidden_layers'], 'model.num_heads': heads,
      'model.num_kv_heads': hf.get('num_key_value_heads') or heads,
      'model.head_dim': hf.get('head_dim') or d // heads,
      'model.ffn_dim': hf['intermediate_size'],
      'model.max_seq_len': hf.get('max_position_embeddings', 4096),
      'model.rope_theta': _rope_theta(hf, where),
      'model.norm_eps': hf.get('rms_norm_eps', 1e-6),
      'model.qk_norm': fam.qk_norm,
      'model.first_k_dense': first, 'model.moe_layer_freq': freq,
      'model.moe.num_experts': experts,
      'model.moe.num_experts_per_tok': hf['num_experts_per_tok'],
      'model.moe.expert_ffn_dim': expert_width,
      'model.moe.num_shared_experts': 0,
      'model.moe.router.score_fn': 'softmax',
      'model.moe.router.norm_topk_prob': bool(fam.always_norm_topk or hf.get('norm_topk_prob')),
      'model.moe.dispatch.name': 'dropless',
      'model.moe.balance.aux_loss_weight': float(hf.get('router_aux_loss_coef') or 0.0),
      'model.moe.balance.z_loss_weight': float(hf.get(fam.z_loss_key) or 0.0)
      if fam.z_loss_key else 0.0,
  }
  if hf.get('router_jitter_noise'):
    f['model.moe.router.jitter'] = float(hf['router_jitter_noise'])
  return f
