"""Qwen3-MoE (Qwen3 technical report, arXiv:2505.09388; the models' config.json): GQA with
RMSNorm of queries and keys per head, every layer MoE, 128 experts, top-8 renormalised, no
shared expert, global-batch balance loss 0.001.
`--config=configs/qwen3_moe.py` (Qwen3-30B-A3B), `configs/qwen3_moe.py:235b` (Qwen3-235B-A22B)
or `configs/qwen3_moe.py:tiny` (CPU)."""
from moejax.configs.published import published

COMMON = {'model.first_k_dense': 0, 'model.qk_norm': 'head', 'model.moe.num_shared_experts': 0,
          'model.moe.router.norm_topk_prob': True, 'model.moe.balance.aux_loss_weight': 0.001,
          'model.rope_theta': 1e6, 'model.norm_eps': 1e-6}
FULL = {**COMMON,  # Qwen3-30B-A3B
        'model.vocab_size': 151936, 'model.d_model': 2048, 'model.num_layers': 48,
        'model.num_heads': 32, 'model.num_kv_heads': 4, 'model.head_dim': 128,
        'model.ffn_dim': 6144, 'model.max_seq_len': 40960,
        'model.moe.num_experts': 128, 'model.moe.num_experts_per_tok': 8,
        'model.moe.expert_ffn_dim': 768}
LARGE = {**FULL,  # Qwen3-235B-A22B
         'model.d_model': 4096, 'model.num_layers': 94, 'model.num_heads': 64,
         'model.ffn_dim': 12288, 'model.moe.expert_ffn_dim': 1536}
TINY = {**COMMON,
        'model.d_model': 64, 'model.num_layers': 2, 'model.num_heads': 4, 'model.num_kv_heads': 2,
        'model.head_dim': 16,
        'model.moe.num_experts': 16, 'model.moe.num_experts_per_tok': 4,
        'model.moe.expert_ffn_dim': 32}


def get_config(arg=None):
  return published(None, LARGE, TINY) if arg == '235b' else published(arg, FULL, TINY)
