"""Quickstart: a tiny DeepSeekMoE-style byte-level LM on Python's own standard library.

First layer dense, then fine-grained routed experts (16 of width 64, top-4) plus one shared
expert, dropless dispatch. Trains on a 2-core CPU in under 2 minutes.
"""
from moejax.config import base_config


def get_config():
  c = base_config()
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim = 128, 4, 4, 2, 32
  m.ffn_dim = 384
  m.first_k_dense, m.moe_layer_freq = 1, 1
  m.moe.num_experts, m.moe.num_experts_per_tok, m.moe.expert_ffn_dim = 16, 4, 64
  m.moe.num_shared_experts = 1
  m.moe.router.norm_topk_prob = False  # DeepSeekMoE: gate weights are the softmax scores.
  m.moe.dispatch.name = 'dropless'
  c.data.seq_len = 128
  c.train.steps, c.train.batch_size, c.train.lr, c.train.warmup_steps = 240, 16, 3e-3, 24
  c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 10, 80, 80
  c.train.final_eval_batches = 0  # at the end, the whole validation split
  return c
