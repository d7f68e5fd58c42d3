"""`python -m moejax.bench train --json`: the whole train step (forward, backward, AdamW) of a
MoE model against a dense model with the same active parameters and the same attention.

Rows, one JSON object per line:
- 'dense' and 'moe_<dispatch>' for each --dispatches entry: ms per step (median of --reps
  after a warm-up), tokens/s, ratio to the dense step, model TFLOP/s per device (training
  FLOPs per token, moejax/costs/flops.py, x tokens/s) and MFU against the device's bf16 peak
  (None on CPU), compile seconds, compiled temporary memory (memory_analysis) and its ratio to
  the dense step's;
- 'compile_depth' for each --depths entry: compile seconds of the MoE step (first dispatch) at
  that depth. Layers are nn.scan stacks, so compile time should not grow with depth.

The dense model is the MoE config with every layer dense (first_k_dense = num_layers) and
ffn_dim = (K + shared) x expert width, so a token's FFN FLOPs match; attention is identical.
"""
from __future__ import annotations

import statistics
import time

import jax
import numpy as np

from moejax.config import base_config
from moejax.costs.flops import flops_per_token, peak_tflops
from moejax.costs.parameters import count_params
from moejax.training.workdir import open_run


def _config(a, dispatch: str | None, layers: int):
  c = base_config()
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = a.d_model, layers, a.heads, a.heads // 2
  m.head_dim = a.d_model // a.heads
  m.moe.num_experts, m.moe.num_experts_per_tok = a.experts, a.top_k
  m.moe.expert_ffn_dim, m.moe.num_shared_experts = a.expert_dim, a.shared
  if dispatch in ('dropless', 'ring'):
    m.moe.experts.block_size = a.block_size
  m.first_k_dense = 0
  if dispatch is None:  # dense: the same active FFN width in every layer
    m.first_k_dense = layers
    m.ffn_dim = (a.top_k + a.shared) * a.expert_dim
  else:
    m.moe.dispatch.name = dispatch
    if dispatch == 'einsum':
      m.moe.dispatch.group_size = min(512, a.batch * a.seq)
  c.data.seq_len, m.max_seq_len = a.seq, max(a.seq, 8)
  c.train.batch_size, c.train.steps, c.train.warmup_steps = a.batch, 1000, 10
  c.mesh.data = 1
  m.dtype = getattr(a, 'dtype', 'float32')
  if dispatch in ('dropless', 'ring'):
    m.moe.experts.backend = getattr(a, 'backend', 'auto')
  return c


def _step(a, config, reps: int):
  """(compile s, median ms per step, temp bytes) of one config's jitted train step."""
  trainer = open_run(config, jax.devices()[:1]).trainer
  state = trainer.init(0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (a.batch, a.seq + 1)).astype(np.int32)
  batch = trainer.device_batch({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]})
  seed = trainer._seed()
  t0 = time.perf_counter()
  compiled = trainer.lower_train_step(state, batch).compile()
  compile_s = time.perf_counter() - t0
  temp = compiled.memory_analysis().temp_size_in_bytes
  if reps == 0:
    return compile_s, None, temp
  state, m = compiled(state, batch, seed)  # warm-up
  jax.block_until_ready(m)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch, seed)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  return compile_s, statistics.median(times) * 1e3, temp


def bench_train(a):
  """Yields one row per case, as soon as it is measured."""
  tokens = a.batch * a.seq
  dense = None
  peak = peak_tflops(jax.devices()[0].device_kind, getattr(a, 'peak_tflops', 0.0))
  for name, dispatch in [('dense', None)] + [(f'moe_{d}', d) for d in a.dispatches]:
    config = _config(a, dispatch, a.layers)
    compile_s, ms, temp = _step(a, config, a.reps)
    if dense is None:
      dense = (ms, temp)
    counts = count_params(config.model)
    tflops = flops_per_token(config.model, a.seq)['train'] * tokens / ms * 1e3 / 1e12
    yield {'case': name, 'layers': a.layers, 'tokens_per_step': tokens, 'd_model': a.d_model,
           'experts': a.experts, 'top_k': a.top_k, 'shared': a.shared,
           'expert_dim': a.expert_dim, 'params': counts['total'],
           'active_params': counts['active'], 'dtype': config.model.dtype, 'ms': round(ms, 2),
           'tokens_per_sec': round(tokens / ms * 1e3), 'ratio_to_dense': round(ms / dense[0], 3),
           'tflops_per_device': round(tflops, 4),
           'mfu': round(tflops / peak, 4) if peak else None,
           'compile_s': round(compile_s, 2), 'temp_bytes': int(temp),
           'temp_ratio_to_dense': round(temp / max(dense[1], 1), 3),
           'backend': jax.default_backend()}
  for layers in a.depths:
    compile_s, _, temp = _step(a, _config(a, a.dispatches[0], layers), 0)
    yield {'case': 'compile_depth', 'dispatch': a.dispatches[0], 'layers': layers,
           'compile_s': round(compile_s, 2), 'temp_bytes': int(temp)}
