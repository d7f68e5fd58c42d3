"""DeepSeek-V3 (arXiv:2412.19437): 61 layers, d 7168, MLA, first 3 layers dense (FFN 18432),
256 routed experts of 2048 + 1 shared, top-8, sigmoid gate with loss-free bias, group-limited
routing (8 groups, keep 4), routed_scaling_factor 2.5, sequence-wise loss 1e-4, one MTP
module with loss weight 0.3 (the paper lowers it to 0.1 later in training).
`--config=configs/deepseek_v3.py` (published shape) or `configs/deepseek_v3.py:tiny` (CPU).
`:v32` is DeepSeek-V3.2 (arXiv:2512.02556): the same model with DeepSeek Sparse Attention, a
lightning indexer of 64 heads of 128 in every layer choosing 2048 keys per query
(`model.mla.index_*`); `:v32_tiny` its CPU variant (8 of up to 64 keys)."""
from moejax.configs.published import published

COMMON = {
    'model.attention': 'mla', 'model.moe.num_shared_experts': 1,
    'model.moe.router.score_fn': 'sigmoid', 'model.moe.router.norm_topk_prob': True,
    'model.moe.router.routed_scaling_factor': 2.5, 'model.moe.router.group_score': 'top2_sum',
    'model.moe.balance.aux_loss_weight': 0.0, 'model.moe.balance.seq_aux_loss_weight': 1e-4,
    'model.moe.balance.bias_update_rate': 1e-3, 'model.tie_embeddings': False,
    'model.mtp.depth': 1, 'model.mtp.loss_weight': 0.3,
}
FULL = {**COMMON,
        'model.vocab_size': 129280, 'model.d_model': 7168, 'model.num_layers': 61,
        'model.num_heads': 128, 'model.num_kv_heads': 128, 'model.head_dim': 128,
        'model.ffn_dim': 18432, 'model.first_k_dense': 3, 'model.max_seq_len': 4096,
        'model.mla.q_lora_rank': 1536, 'model.mla.kv_lora_rank': 512,
        'model.mla.qk_nope_head_dim': 128, 'model.mla.qk_rope_head_dim': 64,
        'model.mla.v_head_dim': 128,
        'model.moe.num_experts': 256, 'model.moe.num_experts_per_tok': 8,
        'model.moe.expert_ffn_dim': 2048, 'model.moe.router.num_groups': 8,
        'model.moe.router.topk_groups': 4}
TINY = {**COMMON,
        'model.d_model': 64, 'model.num_layers': 4, 'model.num_heads': 4, 'model.num_kv_heads': 4,
        'model.head_dim': 16, 'model.ffn_dim': 192, 'model.first_k_dense': 2,
        'model.mla.q_lora_rank': 32, 'model.mla.kv_lora_rank': 16,
        'model.mla.qk_nope_head_dim': 16, 'model.mla.qk_rope_head_dim': 8,
        'model.mla.v_head_dim': 16,
        'model.moe.num_experts': 16, 'model.moe.num_experts_per_tok': 4,
        'model.moe.expert_ffn_dim': 32, 'model.moe.router.num_groups': 4,
        'model.moe.router.topk_groups': 2}


SPARSE = {'model.mla.index_topk': 2048, 'model.mla.index_heads': 64,
          'model.mla.index_head_dim': 128}
SPARSE_TINY = {'model.mla.index_topk': 8, 'model.mla.index_heads': 4,
               'model.mla.index_head_dim': 16}


def get_config(arg=None):
  if arg in ('v32', 'v32_tiny'):
    tiny = arg == 'v32_tiny'
    return published('tiny' if tiny else None, {**FULL, **SPARSE}, {**TINY, **SPARSE_TINY})
  return published(arg, FULL, TINY)
