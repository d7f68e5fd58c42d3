"""Llama 4 (Meta, April 2025; the models' config.json), text model: 48 layers, d 5120, GQA
40/8 heads of 128; every 4th layer without rotary embedding (full attention, temperature-tuned
queries), the others in chunks of 8192 positions; top-1 sigmoid router whose weight scales the
expert's input, plus one shared expert of the routed width.
Scout (17B-16E, the default): 16 experts in every layer, L2-normalised q/k, llama3 rotary
scaling x16. `:maverick` (17B-128E): 128 experts in every other layer (dense FFN 16384 between),
no q/k norm. `:tiny` (CPU)."""
from moejax.configs.published import published

COMMON = {'model.first_k_dense': 0, 'model.moe.num_shared_experts': 1,
          'model.moe.num_experts_per_tok': 1, 'model.moe.router.score_fn': 'sigmoid',
          'model.moe.router.norm_topk_prob': False, 'model.moe.gate_input': True,
          'model.moe.balance.aux_loss_weight': 0.001, 'model.nope_every': 4,
          'model.nope_temperature': 0.1, 'model.rope_theta': 5e5, 'model.norm_eps': 1e-5}
SCOUT = {**COMMON,
         'model.vocab_size': 202048, 'model.d_model': 5120, 'model.num_layers': 48,
         'model.num_heads': 40, 'model.num_kv_heads': 8, 'model.head_dim': 128,
         'model.ffn_dim': 16384, 'model.max_seq_len': 10485760, 'model.attention_chunk': 8192,
         'model.nope_temperature_floor': 8192, 'model.qk_norm': 'l2',
         'model.rope_scaling.kind': 'llama3', 'model.rope_scaling.factor': 16.0,
         'model.rope_scaling.low_freq_factor': 1.0, 'model.rope_scaling.high_freq_factor': 1.0,
         'model.rope_scaling.original_max_len': 8192,
         'model.moe.num_experts': 16, 'model.moe.expert_ffn_dim': 8192}
MAVERICK = {**SCOUT, 'model.qk_norm': 'none', 'model.rope_scaling.kind': 'none',
            'model.max_seq_len': 1048576, 'model.moe_layer_freq': 2, 'model.first_k_dense': 1,
            'model.moe.num_experts': 128}
TINY = {**COMMON,
        'model.d_model': 64, 'model.num_layers': 4, 'model.num_heads': 4, 'model.num_kv_heads': 2,
        'model.head_dim': 16, 'model.ffn_dim': 96, 'model.attention_chunk': 16,
        'model.nope_temperature_floor': 16, 'model.qk_norm': 'l2',
        'model.moe.num_experts': 8, 'model.moe.expert_ffn_dim': 48}


def get_config(arg=None):
  return published(None, MAVERICK, TINY) if arg == 'maverick' else published(arg, SCOUT, TINY)
