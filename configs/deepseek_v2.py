"""DeepSeek-V2 (arXiv:2405.04434): 60 layers, d 5120, MLA, first layer dense (FFN 12288),
160 routed experts of 1536 + 2 shared, top-6, softmax gate (not renormalised),
device-limited routing (8 devices, keep 3), routed_scaling_factor 16, expert/device/comm
balance losses 0.003 / 0.05 / 0.02.
`--config=configs/deepseek_v2.py` (published shape), `configs/deepseek_v2.py:lite`
(DeepSeek-V2-Lite) or `configs/deepseek_v2.py:tiny` (CPU)."""
from moejax.configs.published import published

COMMON = {
    'model.attention': 'mla', 'model.moe.num_shared_experts': 2,
    'model.moe.router.score_fn': 'softmax', 'model.moe.router.norm_topk_prob': False,
    'model.moe.router.group_score': 'max', 'model.moe.balance.aux_loss_weight': 0.003,
    'model.moe.balance.device_loss_weight': 0.05, 'model.moe.balance.comm_loss_weight': 0.02,
}
FULL = {**COMMON,
        'model.vocab_size': 102400, 'model.d_model': 5120, 'model.num_layers': 60,
        'model.num_heads': 128, 'model.num_kv_heads': 128, 'model.head_dim': 128,
        'model.ffn_dim': 12288, 'model.first_k_dense': 1, 'model.max_seq_len': 4096,
        'model.mla.q_lora_rank': 1536, 'model.mla.kv_lora_rank': 512,
        'model.mla.qk_nope_head_dim': 128, 'model.mla.qk_rope_head_dim': 64,
        'model.mla.v_head_dim': 128, 'model.moe.router.routed_scaling_factor': 16.0,
        'model.moe.num_experts': 160, 'model.moe.num_experts_per_tok': 6,
        'model.moe.expert_ffn_dim': 1536, 'model.moe.router.num_groups': 8,
        'model.moe.router.topk_groups': 3, 'model.moe.balance.num_devices': 8}
TINY = {**COMMON,
        'model.d_model': 64, 'model.num_layers': 3, 'model.num_heads': 4, 'model.num_kv_heads': 4,
        'model.head_dim': 16, 'model.ffn_dim': 192, 'model.first_k_dense': 1,
        'model.mla.q_lora_rank': 32, 'model.mla.kv_lora_rank': 16,
        'model.mla.qk_nope_head_dim': 16, 'model.mla.qk_rope_head_dim': 8,
        'model.mla.v_head_dim': 16,
        'model.moe.num_experts': 16, 'model.moe.num_experts_per_tok': 4,
        'model.moe.expert_ffn_dim': 32, 'model.moe.router.num_groups': 4,
        'model.moe.router.topk_groups': 2, 'model.moe.balance.num_devices': 4}


# DeepSeek-V2-Lite (the same paper): 27 layers, d 2048, no query latent, first layer dense
# (FFN 10944), 64 routed experts of 1408 + 2 shared, top-6, no device-limited routing.
LITE = {**FULL,
        'model.d_model': 2048, 'model.num_layers': 27, 'model.num_heads': 16,
        'model.num_kv_heads': 16, 'model.ffn_dim': 10944, 'model.mla.q_lora_rank': 0,
        'model.moe.num_experts': 64, 'model.moe.expert_ffn_dim': 1408,
        'model.moe.router.routed_scaling_factor': 1.0, 'model.moe.router.num_groups': 1,
        'model.moe.router.topk_groups': 1, 'model.moe.router.group_score': 'auto',
        'model.moe.balance.aux_loss_weight': 0.001, 'model.moe.balance.device_loss_weight': 0.0,
        'model.moe.balance.comm_loss_weight': 0.0, 'model.moe.balance.num_devices': 0}


def get_config(arg=None):
  return published(None, LITE, TINY) if arg == 'lite' else published(arg, FULL, TINY)
