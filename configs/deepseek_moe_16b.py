"""DeepSeekMoE 16B (arXiv:2401.06066): 28 layers, d 2048, multi-head attention (16 x 128),
first layer dense (FFN 10944), 64 routed experts of 1408 + 2 shared, top-6, softmax gate
(not renormalised), expert-level balance loss 0.001.
`--config=configs/deepseek_moe_16b.py` or `configs/deepseek_moe_16b.py:tiny` (CPU)."""
from moejax.configs.published import published

COMMON = {'model.moe.num_shared_experts': 2, 'model.moe.router.norm_topk_prob': False,
          'model.moe.balance.aux_loss_weight': 0.001}
FULL = {**COMMON,
        'model.vocab_size': 102400, 'model.d_model': 2048, 'model.num_layers': 28,
        'model.num_heads': 16, 'model.num_kv_heads': 16, 'model.head_dim': 128,
        'model.ffn_dim': 10944, 'model.first_k_dense': 1, 'model.max_seq_len': 4096,
        'model.moe.num_experts': 64, 'model.moe.num_experts_per_tok': 6,
        'model.moe.expert_ffn_dim': 1408}
TINY = {**COMMON,
        'model.d_model': 64, 'model.num_layers': 3, 'model.num_heads': 4, 'model.num_kv_heads': 4,
        'model.head_dim': 16, 'model.ffn_dim': 176, 'model.first_k_dense': 1,
        'model.moe.num_experts': 16, 'model.moe.num_experts_per_tok': 6,
        'model.moe.expert_ffn_dim': 24}


def get_config(arg=None):
  return published(arg, FULL, TINY)
