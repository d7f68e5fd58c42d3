"""OLMoE-1B-7B (arXiv:2409.02060): 16 layers, d 2048, RMSNorm of the whole query and key
projections, every layer MoE with 64 experts of 1024, top-8 softmax weights not renormalised,
no shared expert, balance loss 0.01 and router z-loss 0.001.
`--config=configs/olmoe.py` or `configs/olmoe.py:tiny` (CPU)."""
from moejax.configs.published import published

COMMON = {'model.first_k_dense': 0, 'model.qk_norm': 'full', 'model.moe.num_shared_experts': 0,
          'model.moe.router.norm_topk_prob': False, 'model.moe.balance.aux_loss_weight': 0.01,
          'model.moe.balance.z_loss_weight': 0.001, 'model.norm_eps': 1e-5}
FULL = {**COMMON,
        'model.vocab_size': 50304, 'model.d_model': 2048, 'model.num_layers': 16,
        'model.num_heads': 16, 'model.num_kv_heads': 16, 'model.head_dim': 128,
        'model.max_seq_len': 4096,
        'model.moe.num_experts': 64, 'model.moe.num_experts_per_tok': 8,
        'model.moe.expert_ffn_dim': 1024}
TINY = {**COMMON,
        'model.d_model': 64, 'model.num_layers': 2, 'model.num_heads': 4, 'model.num_kv_heads': 4,
        'model.head_dim': 16,
        'model.moe.num_experts': 16, 'model.moe.num_experts_per_tok': 4,
        'model.moe.expert_ffn_dim': 32}


def get_config(arg=None):
  return published(arg, FULL, TINY)
