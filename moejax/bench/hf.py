"""Hugging Face transformers' DeepSeek-V3 MoE block on the benchmark's shape (PyTorch, CPU), and
a PyTorch dense SwiGLU FFN with the same active parameters for its own ratio. Used by
`python -m moejax.bench moe --hf`; needs the optional `torch` extra."""
from __future__ import annotations

import statistics
import time

IMPLEMENTATIONS = ('grouped_mm', 'eager')


def _time(fn, reps: int) -> float:
  fn()  # warm-up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times) * 1e3


def bench_hf(a):
  """Yields rows for the torch dense FFN and each expert implementation of DeepseekV3MoE."""
  import torch
  import transformers
  from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds3
  torch.manual_seed(0)
  dtype = getattr(torch, a.dtype)
  batch = max(1, a.tokens // a.seq)
  x = torch.randn(batch, a.seq, a.d_model, dtype=dtype)
  cot = torch.randn_like(x)
  active = a.top_k + a.shared
  hidden = active * a.expert_dim
  dense = torch.nn.ModuleDict({'wi_0': torch.nn.Linear(a.d_model, hidden, bias=False),
                               'wi_1': torch.nn.Linear(a.d_model, hidden, bias=False),
                               'wo': torch.nn.Linear(hidden, a.d_model, bias=False)}).to(dtype)

  def dense_step():
    xi = x.detach().requires_grad_()
    h = torch.nn.functional.silu(dense['wi_0'](xi)) * dense['wi_1'](xi)
    (dense['wo'](h) * cot).sum().backward()

  dense_ms = _time(dense_step, a.reps)
  common = {'tokens': a.tokens, 'd_model': a.d_model, 'experts': a.experts,
            'expert_dim': a.expert_dim, 'top_k': a.top_k, 'shared': a.shared, 'dtype': a.dtype,
            'torch': torch.__version__, 'transformers': transformers.__version__,
            'threads': torch.get_num_threads()}
  yield {'case': 'hf_torch_dense_ffn', 'ms': round(dense_ms, 2), 'ratio_to_torch_dense': 1.0,
         **common}
  for impl in IMPLEMENTATIONS:
    cfg = transformers.DeepseekV3Config(
        hidden_size=a.d_model, moe_intermediate_size=a.expert_dim, n_routed_experts=a.experts,
        num_experts_per_tok=a.top_k, n_group=1, topk_group=1, n_shared_experts=a.shared,
        norm_topk_prob=True, num_hidden_layers=1, vocab_size=64, intermediate_size=64)
    cfg._experts_implementation = impl
    block = ds3.DeepseekV3MoE(cfg).to(dtype)
    for p in block.parameters():
      torch.nn.init.normal_(p, std=0.02)

    def step():
      xi = x.detach().requires_grad_()
      (block(xi) * cot).sum().backward()

    ms = _time(step, a.reps)
    yield {'case': f'hf_deepseek_v3_{impl}', 'ms': round(ms, 2),
           'ratio_to_torch_dense': round(ms / dense_ms, 3), **common}
