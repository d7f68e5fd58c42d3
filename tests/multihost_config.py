"""The config of the multi-host test (test_multihost.py), for both the two-process run
(`python -m moejax.main --config=tests/multihost_config.py ...`) and the one-process run."""
from moejax.config import base_config


def get_config():
  c = base_config()
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim = 32, 3, 4, 2, 8
  m.ffn_dim, m.first_k_dense = 64, 1
  m.moe.num_experts, m.moe.num_experts_per_tok, m.moe.expert_ffn_dim = 8, 2, 16
  m.moe.balance.bias_update_rate = 1e-2  # global counts must agree across processes
  c.mesh.data, c.mesh.expert = 2, 4  # experts split 4 ways, batch over both processes
  c.data.seq_len, c.data.max_bytes = 16, 200_000
  c.train.batch_size, c.train.steps, c.train.warmup_steps = 8, 4, 1
  c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 1, 2, 2
  c.train.eval_batches, c.train.progress = 2, False
  return c
