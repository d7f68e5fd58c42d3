"""Shared base config and smoke settings for the experiments in this folder (not an experiment).

The base is a small byte-level decoder on Python's standard library (the quickstart corpus):
d_model 64, 4 layers (the first dense), 8 routed experts of width 128, top-2 (active FFN width
256, the dense layer's width), dropless dispatch, AdamW. Sized so one run takes well under a
minute on a 2-core CPU; each experiment changes only what it compares.
"""
from moejax.config import base_config

# --smoke: a few steps on a small slice of the corpus, so the tests can run every experiment.
SMOKE = {'train.steps': 4, 'train.warmup_steps': 1, 'train.log_every': 2, 'train.eval_every': 2,
         'train.checkpoint_every': 2, 'train.eval_batches': 1, 'train.batch_size': 8,
         'data.seq_len': 32, 'data.max_bytes': 100_000}


def base(steps: int = 200):
  c = base_config()
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim = 64, 4, 4, 2, 16
  m.ffn_dim, m.first_k_dense, m.moe_layer_freq = 256, 1, 1
  m.moe.num_experts, m.moe.num_experts_per_tok, m.moe.expert_ffn_dim = 8, 2, 128
  m.moe.num_shared_experts = 0
  m.moe.dispatch.name = 'dropless'
  c.data.seq_len = 64
  t = c.train
  t.steps, t.batch_size, t.lr, t.warmup_steps = steps, 16, 3e-3, steps // 10
  t.log_every, t.eval_every, t.eval_batches = 10, steps // 4, 4
  t.checkpoint_every, t.keep_checkpoints = steps // 2, 2
  return c
