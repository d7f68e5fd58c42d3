"""moejax -> Hugging Face: a config.json for a moejax config, and the safetensors written tensor
by tensor from a checkpoint's parameters (`export_workdir`: a folder that
`transformers.AutoModelForCausalLM.from_pretrained` loads). The other way: convert.py.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from moejax.errors import ConfigError
from moejax.model.schedule import moe_layer_ids
from moejax.hf import families, tensor_files, weights
from moejax.hf.convert import _get, peak_memory_mb


ARCHITECTURES = {'mixtral': 'MixtralForCausalLM', 'qwen3_moe': 'Qwen3MoeForCausalLM',
                 'qwen2_moe': 'Qwen2MoeForCausalLM', 'olmoe': 'OlmoeForCausalLM',
                 'deepseek_v2': 'DeepseekV2ForCausalLM', 'deepseek_v3': 'DeepseekV3ForCausalLM',
                 'llama4_text': 'Llama4ForCausalLM'}


def hf_config_of(c, base: dict | None, model_type: str) -> dict:
  """A Hugging Face config.json for moejax config c (over the imported one when there is)."""
  m, moe = c.model, c.model.moe
  fam = families.FAMILIES[model_type]
  llama4 = model_type == 'llama4_text'
  gated = bool(fam.shared_key) and moe.shared_expert_gate and moe.num_shared_experts == 1
  shared_ok = (fam.latent_attention or (llama4 and moe.num_shared_experts == 1) or
               bool(moe.num_shared_experts) == gated)
  mismatch = [f'{k}={v!r}' for k, v, ok in (
      ('qk_norm', m.qk_norm, m.qk_norm in (('none', 'l2') if llama4 else (fam.qk_norm,))),
      ('attention', m.attention, (m.attention == 'mla') == fam.latent_attention),
      ('qkv_bias', m.qkv_bias, not m.qkv_bias or fam.qkv_bias_key),
      ('experts.name', moe.experts.name, moe.experts.name == 'swiglu'),
      ('shared_expert_gate', moe.shared_expert_gate, moe.shared_expert_gate == gated),
      ('gate_input', moe.gate_input, moe.gate_input == llama4),
      ('nope_every', m.nope_every, llama4 or not m.nope_every),
      ('attention_chunk', m.attention_chunk, llama4 or not m.attention_chunk),
      ('num_shared_experts', moe.num_shared_experts, shared_ok)) if not ok]
  if m.mtp.depth and model_type != 'deepseek_v3':
    mismatch.append(f'mtp.depth={m.mtp.depth}')
  if mismatch:
    raise ConfigError(f'--model_type={model_type}: this model ({", ".join(mismatch)}) is not '
                      f'a {model_type} model')
  hf = dict(base or {})
  hf.update({
      'model_type': model_type, 'vocab_size': m.vocab_size, 'hidden_size': m.d_model,
      'num_hidden_layers': m.num_layers, 'num_attention_heads': m.num_heads,
      'num_key_value_heads': m.num_kv_heads, 'head_dim': m.head_dim,
      'intermediate_size': m.ffn_dim, 'max_position_embeddings': m.max_seq_len,
      'rms_norm_eps': m.norm_eps, 'num_experts_per_tok': moe.num_experts_per_tok,
      'tie_word_embeddings': False, 'hidden_act': 'silu',
      'norm_topk_prob': bool(moe.router.norm_topk_prob)})
  for key in ('rope_scaling', 'rope_theta', 'num_local_experts', 'num_experts'):
    hf.pop(key, None)
  hf['rope_parameters'] = {'rope_theta': m.rope_theta, 'rope_type': 'default'}
  r = m.rope_scaling
  if r.kind == 'llama3':
    hf['rope_parameters'].update(rope_type='llama3', factor=r.factor,
                                 low_freq_factor=r.low_freq_factor,
                                 high_freq_factor=r.high_freq_factor,
                                 original_max_position_embeddings=r.original_max_len)
  ids = moe_layer_ids(m)
  if llama4:
    _llama4_config(hf, m, ids)
  elif model_type == 'mixtral':
    hf.update(num_local_experts=moe.num_experts, intermediate_size=moe.expert_ffn_dim)
  elif fam.latent_attention:
    _latent_config(hf, m, model_type)
  else:
    hf.update(num_experts=moe.num_experts)
  if model_type in ('qwen3_moe', 'qwen2_moe'):
    hf.update(moe_intermediate_size=moe.expert_ffn_dim, decoder_sparse_step=1,
              mlp_only_layers=[i for i in range(m.num_layers) if i not in ids])
  elif not (fam.latent_attention or llama4) and ids != list(range(m.num_layers)):
    raise ConfigError(f'--model_type={model_type}: has a MoE FFN in every layer, but this model '
                      f'has dense layers (first_k_dense={m.first_k_dense}, moe_layer_freq='
                      f'{m.moe_layer_freq})')
  if fam.qkv_bias_key:
    hf[fam.qkv_bias_key] = bool(m.qkv_bias)
  if fam.shared_key:
    hf[fam.shared_key] = moe.shared_expert_ffn_dim or moe.expert_ffn_dim
  hf.setdefault('architectures', [ARCHITECTURES[model_type]])
  return hf


def _llama4_config(hf: dict, m, ids: list[int]) -> None:
  moe, n = m.moe, m.num_layers
  if moe.router.score_fn != 'sigmoid' or moe.router.norm_topk_prob:
    raise ConfigError("--model_type=llama4_text: routes with score_fn='sigmoid' and no "
                      'renormalisation; this model does not')
  rope = [int(not m.nope_every or (i + 1) % m.nope_every != 0) for i in range(n)]
  hf.update(intermediate_size=moe.expert_ffn_dim, intermediate_size_mlp=m.ffn_dim,
            num_local_experts=moe.num_experts, moe_layers=ids,
            interleave_moe_layer_step=m.moe_layer_freq, use_qk_norm=m.qk_norm == 'l2',
            no_rope_layers=rope, no_rope_layer_interval=m.nope_every or 4,
            attention_chunk_size=m.attention_chunk or None,
            layer_types=[('chunked_attention' if r and m.attention_chunk else 'full_attention')
                         for r in rope],
            attn_temperature_tuning=bool(m.nope_temperature), attn_scale=m.nope_temperature,
            floor_scale=m.nope_temperature_floor, attention_bias=False)


def _latent_config(hf: dict, m, model_type: str) -> None:
  moe, mla = m.moe, m.mla
  v3 = model_type == 'deepseek_v3'
  score = 'sigmoid' if v3 else 'softmax'
  if moe.router.score_fn != score or (moe.shared_expert_ffn_dim and moe.shared_expert_ffn_dim !=
                                      moe.num_shared_experts * moe.expert_ffn_dim):
    raise ConfigError(f'--model_type={model_type}: routes with score_fn={score!r} and shared '
                      'experts of the routed width; this model does not')
  groups = moe.router.num_groups
  hf.update(q_lora_rank=mla.q_lora_rank or None, kv_lora_rank=mla.kv_lora_rank,
            qk_nope_head_dim=mla.qk_nope_head_dim, qk_rope_head_dim=mla.qk_rope_head_dim,
            v_head_dim=mla.v_head_dim, head_dim=mla.qk_rope_head_dim,
            num_key_value_heads=m.num_heads, n_routed_experts=moe.num_experts,
            n_shared_experts=moe.num_shared_experts, moe_intermediate_size=moe.expert_ffn_dim,
            first_k_dense_replace=m.first_k_dense, moe_layer_freq=m.moe_layer_freq,
            routed_scaling_factor=moe.router.routed_scaling_factor, n_group=groups,
            topk_group=moe.router.topk_groups if groups > 1 else 1)
  if v3:
    hf.update(topk_method='noaux_tc', rope_interleave=False,  # written in moejax's halves
              num_nextn_predict_layers=m.mtp.depth)
  else:
    hf['topk_method'] = 'group_limited_greedy' if groups > 1 else 'greedy'


def export_tensors(variables, m, fam, dtype, interleaved: bool = False):
  """(name, shape, dtype, producer) of every Hugging Face tensor, made on demand."""
  out, fused = [], {}
  for path, layers, template, _, to_hf, per_expert in weights.leaves(m, fam, interleaved):
    leaf = _get(variables, path)
    if per_expert == 'fused':  # halves of one stacked tensor, joined on the last axis
      for layer, index in layers:
        name = weights.hf_name(template, layer)
        if name not in fused:
          fused[name] = []
          value = leaf if index is None else leaf[index]
          shape = value.shape[:-1] + (2 * value.shape[-1],)
          out.append((name, shape, dtype, lambda parts=fused[name]: np.concatenate(
              [np.asarray(p, np.float32) for p in parts], axis=-1)))
        fused[name].append(leaf if index is None else leaf[index])
      continue
    if path[0] != 'params':
      leaf_dtype = np.float32  # the selection bias is a float32 buffer in transformers too
    for layer, index in layers:
      value = leaf if index is None else leaf[index]
      kind = dtype if path[0] == 'params' else leaf_dtype
      if per_expert:
        for e in range(m.moe.num_experts):
          shape = to_hf(value[e], m).shape
          out.append((weights.hf_name(template, layer, e), shape, kind,
                      lambda v=value, e=e, f=to_hf: f(np.asarray(v[e], np.float32), m)))
      else:
        shape = to_hf(value, m).shape
        out.append((weights.hf_name(template, layer), shape, kind,
                    lambda v=value, f=to_hf: f(np.asarray(v, np.float32), m)))
  return out


def export_variables(config, variables, hf_dir: str, model_type: str, base: dict | None = None,
                     dtype: str = 'float32', shard_bytes: int = 5 << 30) -> list[str]:
  """Write moejax variables as a Hugging Face folder (config.json + safetensors)."""
  hf = hf_config_of(config, base, model_type)
  hf['torch_dtype'] = dtype
  fam = families.FAMILIES[model_type]
  variables = jax.device_get(variables)
  np_dtype = np.float32 if dtype == 'float32' else jnp.bfloat16
  names = tensor_files.write(hf_dir, export_tensors(variables, config.model, fam, np_dtype,
                                                    families.rope_interleaved(hf)),
                             shard_bytes)
  with open(os.path.join(hf_dir, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=1)
  return names


def export_workdir(workdir: str, hf_dir: str, step: int | None = None, model_type: str = '',
                   dtype: str = 'float32', shard_bytes: int = 5 << 30, log=print) -> dict:
  from moejax.data import tokenizer as tokenizers
  from moejax.generate import load_checkpoint
  from moejax.training import workdir as workdirs
  if dtype not in ('float32', 'bfloat16'):
    raise ConfigError(f'--dtype={dtype}: one of float32, bfloat16')
  workdirs.checkpoints(workdir)[0].close()  # a workdir without checkpoints is said first
  base = None
  if os.path.exists(os.path.join(workdir, tokenizers.IMPORTED_MARK)):
    with open(os.path.join(workdir, tokenizers.IMPORTED_MARK)) as f:
      base = json.load(f)
    model_type = model_type or base['model_type']
  if model_type not in families.FAMILIES:
    raise ConfigError(f'--model_type={model_type!r}: give one of '
                      f'{", ".join(sorted(families.FAMILIES))} (a workdir not imported from '
                      'Hugging Face does not say which)')
  if os.path.exists(hf_dir) and os.listdir(hf_dir):
    raise ConfigError(f'--hf_dir={hf_dir}: exists and is not empty; export into a new folder')
  config, variables = load_checkpoint(workdir, step)
  names = export_variables(config, variables, hf_dir, model_type, base, dtype, shard_bytes)
  tok = tokenizers.from_dir(workdir)
  if not isinstance(tok, tokenizers.ByteTokenizer):
    tokenizers.copy_files(tok, hf_dir)
  report = {'files': names, 'peak_memory_mb': peak_memory_mb()}
  log(f'exported {workdir} -> {hf_dir} ({model_type}, {len(names)} file(s)); peak memory '
      f'{report["peak_memory_mb"]:.0f} MB')
  return report
