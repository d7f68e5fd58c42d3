"""gpt-oss (OpenAI's model card, arXiv:2508.10925; the models' config.json): GQA with 64
query and 8 key/value heads of 64 dims, biased projections and a learned attention sink per
head; windows of 128 tokens on every other layer (starting with the first), full attention on
the rest; yarn rotary scaling (factor 32 over 4,096 positions); every layer MoE, top-4 of
softmax over the chosen router logits (the router has a bias), experts with biases and the
clamped gate (up + 1) * gate * sigmoid(1.702 gate), clamp 7.
`--config=configs/gpt_oss.py` (gpt-oss-20b), `configs/gpt_oss.py:120b` (gpt-oss-120b) or
`configs/gpt_oss.py:tiny` (CPU)."""
from moejax.configs.published import published

COMMON = {'model.first_k_dense': 0, 'model.qkv_bias': True, 'model.attention_out_bias': True,
          'model.attention_sinks': True, 'model.sliding_pattern': (1, 0),
          'model.rope_theta': 150000.0, 'model.rope_scaling.kind': 'yarn',
          'model.rope_scaling.factor': 32.0, 'model.rope_scaling.beta_fast': 32.0,
          'model.rope_scaling.beta_slow': 1.0, 'model.rope_scaling.truncate': False,
          'model.rope_scaling.original_max_len': 4096, 'model.norm_eps': 1e-5,
          'model.moe.num_shared_experts': 0, 'model.moe.router.norm_topk_prob': True,
          'model.moe.router.logit_bias': True, 'model.moe.experts.name': 'glu',
          'model.moe.experts.bias': True, 'model.moe.experts.alpha': 1.702,
          'model.moe.experts.up_offset': 1.0, 'model.moe.experts.limit': 7.0}
FULL = {**COMMON,  # gpt-oss-20b
        'model.vocab_size': 201088, 'model.d_model': 2880, 'model.num_layers': 24,
        'model.num_heads': 64, 'model.num_kv_heads': 8, 'model.head_dim': 64,
        'model.max_seq_len': 131072, 'model.sliding_window': 128,
        'model.moe.num_experts': 32, 'model.moe.num_experts_per_tok': 4,
        'model.moe.expert_ffn_dim': 2880}
LARGE = {**FULL, 'model.num_layers': 36, 'model.moe.num_experts': 128}  # gpt-oss-120b
TINY = {**COMMON,
        'model.d_model': 64, 'model.num_layers': 2, 'model.num_heads': 4, 'model.num_kv_heads': 2,
        'model.head_dim': 16, 'model.sliding_window': 16,
        'model.rope_scaling.original_max_len': 256,
        'model.moe.num_experts': 8, 'model.moe.num_experts_per_tok': 2,
        'model.moe.expert_ffn_dim': 32}


def get_config(arg=None):
  return published(None, LARGE, TINY) if arg == '120b' else published(arg, FULL, TINY)
