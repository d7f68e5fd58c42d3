"""Qwen1.5-MoE-A2.7B (Qwen2-MoE architecture; the model's config.json): 24 layers, d 2048, GQA
with q/k/v biases, every layer MoE with 60 experts of 1408, top-4 softmax weights not
renormalised, plus one shared expert of width 5632 scaled per token by a sigmoid gate.
`--config=configs/qwen2_moe.py` or `configs/qwen2_moe.py:tiny` (CPU)."""
from moejax.configs.published import published

COMMON = {'model.first_k_dense': 0, 'model.qkv_bias': True, 'model.moe.num_shared_experts': 1,
          'model.moe.shared_expert_gate': True, 'model.moe.router.norm_topk_prob': False,
          'model.moe.balance.aux_loss_weight': 0.001, 'model.rope_theta': 1e6}
FULL = {**COMMON,
        'model.vocab_size': 151936, 'model.d_model': 2048, 'model.num_layers': 24,
        'model.num_heads': 16, 'model.num_kv_heads': 16, 'model.head_dim': 128,
        'model.ffn_dim': 5632, 'model.max_seq_len': 8192,
        'model.moe.num_experts': 60, 'model.moe.num_experts_per_tok': 4,
        'model.moe.expert_ffn_dim': 1408, 'model.moe.shared_expert_ffn_dim': 5632}
TINY = {**COMMON,
        'model.d_model': 64, 'model.num_layers': 2, 'model.num_heads': 4, 'model.num_kv_heads': 4,
        'model.head_dim': 16,
        'model.moe.num_experts': 12, 'model.moe.num_experts_per_tok': 4,
        'model.moe.expert_ffn_dim': 32, 'model.moe.shared_expert_ffn_dim': 96}


def get_config(arg=None):
  return published(arg, FULL, TINY)
