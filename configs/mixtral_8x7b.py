"""Mixtral 8x7B (arXiv:2401.04088): 32 layers, d 4096, GQA (32 query / 8 KV heads of 128),
every layer MoE with 8 experts of 14336, top-2 renormalised, no shared expert.
`--config=configs/mixtral_8x7b.py` or `configs/mixtral_8x7b.py:tiny` (CPU)."""
from moejax.configs.published import published

COMMON = {'model.first_k_dense': 0, 'model.moe.num_shared_experts': 0,
          'model.moe.router.norm_topk_prob': True, 'model.moe.balance.aux_loss_weight': 0.001,
          'model.rope_theta': 1e6}
FULL = {**COMMON,
        'model.vocab_size': 32000, 'model.d_model': 4096, 'model.num_layers': 32,
        'model.num_heads': 32, 'model.num_kv_heads': 8, 'model.head_dim': 128,
        'model.max_seq_len': 32768,
        'model.moe.num_experts': 8, 'model.moe.num_experts_per_tok': 2,
        'model.moe.expert_ffn_dim': 14336}
TINY = {**COMMON,
        'model.d_model': 64, 'model.num_layers': 2, 'model.num_heads': 4, 'model.num_kv_heads': 2,
        'model.head_dim': 16,
        'model.moe.num_experts': 8, 'model.moe.num_experts_per_tok': 2,
        'model.moe.expert_ffn_dim': 96}


def get_config(arg=None):
  return published(arg, FULL, TINY)
