"""Qwen3-Next-80B-A3B (the shape of transformers' Qwen3NextConfig defaults; moejax counts the
same 79,674,391,296 parameters as transformers' model built from them): 48 layers of d 2048, three Gated DeltaNet layers (16 key heads and 32
value heads of 128, a causal convolution of 4) then one gated GQA layer (16 query heads and 2
key/value heads of 256, RMSNorm of queries and keys per head, rotary on the first quarter of
each head, an output gate), every layer MoE with 512 experts of 512, top-10 renormalised, plus
one shared expert of 512 scaled per token by a sigmoid gate.
`--config=configs/qwen3_next.py` or `configs/qwen3_next.py:tiny` (CPU)."""
from moejax.configs.published import published

COMMON = {'model.first_k_dense': 0, 'model.linear_pattern': (1, 1, 1, 0),
          'model.qk_norm': 'head', 'model.attention_output_gate': True,
          'model.moe.num_shared_experts': 1, 'model.moe.shared_expert_gate': True,
          'model.moe.router.norm_topk_prob': True, 'model.moe.balance.aux_loss_weight': 0.001,
          'model.norm_eps': 1e-6}
FULL = {**COMMON,
        'model.vocab_size': 151936, 'model.d_model': 2048, 'model.num_layers': 48,
        'model.num_heads': 16, 'model.num_kv_heads': 2, 'model.head_dim': 256,
        'model.rotary_dim': 64, 'model.ffn_dim': 5632, 'model.max_seq_len': 32768,
        'model.linear.num_key_heads': 16, 'model.linear.num_value_heads': 32,
        'model.linear.key_head_dim': 128, 'model.linear.value_head_dim': 128,
        'model.linear.conv_kernel': 4,
        'model.moe.num_experts': 512, 'model.moe.num_experts_per_tok': 10,
        'model.moe.expert_ffn_dim': 512, 'model.moe.shared_expert_ffn_dim': 512}
TINY = {**COMMON,
        'model.d_model': 64, 'model.num_layers': 4, 'model.num_heads': 4, 'model.num_kv_heads': 2,
        'model.head_dim': 16, 'model.rotary_dim': 4,
        'model.linear.num_key_heads': 2, 'model.linear.num_value_heads': 4,
        'model.linear.key_head_dim': 16, 'model.linear.value_head_dim': 16,
        'model.linear.chunk': 16,
        'model.moe.num_experts': 16, 'model.moe.num_experts_per_tok': 4,
        'model.moe.expert_ffn_dim': 32, 'model.moe.shared_expert_ffn_dim': 32}


def get_config(arg=None):
  return published(arg, FULL, TINY)
