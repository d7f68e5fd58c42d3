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
from moejax.hf import families, tensor_files, weights
from moejax.hf.convert import _get, peak_memory_mb


def export_tensors(variables, m, fam, dtype, interleaved: bool = False):
  """(name, shape, dtype, producer) of every Hugging Face tensor, made on demand."""
  out, fused = [], {}
  for path, layers, template, _, to_hf, per_expert in weights.leaves(m, fam, interleaved):
    leaf = _get(variables, path)
    if isinstance(per_expert, weights.Part):  # one of the leaves a tensor holds
      parts, i = per_expert
      for layer, index in layers:
        name = weights.hf_name(template, layer)
        if name not in fused:
          fused[name] = {}
          out.append((name, parts.shape(m), dtype, lambda got=fused[name], p=parts: p.join(
              [np.asarray(got[j], np.float32) for j in range(len(got))], m)))
        fused[name][i] = leaf if index is None else leaf[index]
      continue
    if per_expert in ('fused', 'fused_t'):  # the gate and up parts of one tensor
      for layer, index in layers:
        name = weights.hf_name(template, layer)
        if name not in fused:
          fused[name] = []
          value = leaf if index is None else leaf[index]
          shape = value.shape[:-1] + (2 * value.shape[-1],)
          turned = per_expert == 'fused_t'  # Linear weights: [..., 2F, D]
          if turned:
            shape = shape[:-2] + (shape[-1], shape[-2])
          out.append((name, shape, dtype, lambda parts=fused[name], t=turned:
                      weights.join_parts(parts, fam, t)))
        fused[name].append(leaf if index is None else leaf[index])
      continue
    if per_expert in ('fused_rows', 'fused_heads'):  # q, k, v rows; or per head q, gate rows
      for layer, index in layers:
        name = weights.hf_name(template, layer)
        value = leaf if index is None else leaf[index]
        if name not in fused:
          fused[name] = []
          heads = (m.num_heads + 2 * m.num_kv_heads if per_expert == 'fused_rows' else
                   2 * m.num_heads)
          shape = (heads * m.head_dim,) + to_hf(np.zeros(value.shape, np.float32), m).shape[1:]
          out.append((name, shape, dtype, lambda parts=fused[name], k=per_expert:
                      _join_rows(parts, m, k)))
        fused[name].append((value, to_hf))
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


def _join_rows(parts, m, kind: str) -> np.ndarray:
  """One tensor of the parts' rows (each part through its to_hf): q, k, v one after another
  ('fused_rows'), or per head the query rows then the gate rows ('fused_heads')."""
  rows = [f(np.asarray(v, np.float32), m) for v, f in parts]
  if kind == 'fused_rows':
    return np.concatenate(rows, axis=0)
  per_head = [r.reshape((m.num_heads, 1, m.head_dim) + r.shape[1:]) for r in rows]
  return np.concatenate(per_head, axis=1).reshape((-1,) + rows[0].shape[1:])


def export_variables(config, variables, hf_dir: str, model_type: str, base: dict | None = None,
                     dtype: str = 'float32', shard_bytes: int = 5 << 30) -> list[str]:
  """Write moejax variables as a Hugging Face folder (config.json + safetensors)."""
  hf = families.hf_config(config, base, model_type)
  hf['torch_dtype'] = dtype
  fam = families.FAMILIES[model_type]
  variables = jax.device_get(variables)
  np_dtype = np.float32 if dtype == 'float32' else jnp.bfloat16
  names = tensor_files.write(hf_dir, export_tensors(variables, config.model, fam, np_dtype,
                                                    fam.interleaved(hf)),
                             shard_bytes)
  with open(os.path.join(hf_dir, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=1)
  return names


def check_expressible(config, base: dict | None, model_type: str) -> None:
  """Refuse, in one line, a model that `model_type` cannot express, naming the families that
  can (export's --model_type)."""
  try:
    families.hf_config(config, base, model_type)
  except ConfigError as e:
    fits = []
    for other in sorted(set(families.FAMILIES) - {model_type}):
      try:
        families.hf_config(config, None, other)
        fits.append(other)
      except ConfigError:
        pass
    raise ConfigError(f'{e}; ' + (f'--model_type={" or ".join(fits)} can express it' if fits
                                  else 'no family moejax exports can express it')) from None


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
    model_type = getattr(families.FAMILIES.get(model_type), 'exports_as', '') or model_type
  if model_type not in families.FAMILIES:
    raise ConfigError(f'--model_type={model_type!r}: give one of '
                      f'{", ".join(sorted(families.FAMILIES))} (a workdir not imported from '
                      'Hugging Face does not say which)')
  if os.path.exists(hf_dir) and os.listdir(hf_dir):
    raise ConfigError(f'--hf_dir={hf_dir}: exists and is not empty; export into a new folder')
  config, variables = load_checkpoint(workdir, step)
  check_expressible(config, base, model_type)
  names = export_variables(config, variables, hf_dir, model_type, base, dtype, shard_bytes)
  tok = tokenizers.from_dir(workdir)
  if not isinstance(tok, tokenizers.ByteTokenizer):
    tokenizers.copy_files(tok, hf_dir)
  report = {'files': names, 'peak_memory_mb': peak_memory_mb()}
  log(f'exported {workdir} -> {hf_dir} ({model_type}, {len(names)} file(s)); peak memory '
      f'{report["peak_memory_mb"]:.0f} MB')
  return report
