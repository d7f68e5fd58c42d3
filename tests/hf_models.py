"""Tiny random Hugging Face models of every family moejax imports, built with transformers
(nothing downloaded): what tests/test_hf_families.py and tests/test_hf_import.py build from.
Needs the torch extra (the test modules that import this skip without it)."""
import numpy as np
import torch
import transformers

COMMON = dict(vocab_size=320, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=256,
              eos_token_id=None, bos_token_id=None, pad_token_id=None)
# DeepSeek-V3's shape (MLA with a query latent, groups, a dense first layer).
_V3 = dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
           first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8,
           qk_rope_head_dim=4, v_head_dim=8, n_group=2, topk_group=1, routed_scaling_factor=2.5,
           num_key_value_heads=4)
# Gated DeltaNet settings whose sizes all differ (key heads 2, value heads 4 of 6, key dim 8,
# convolution 3).
_LINEAR = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
               linear_value_head_dim=6, linear_conv_kernel_dim=3)
# Each family with what makes it differ: Mixtral renormalises its top-2; Qwen3-MoE has
# per-head q/k norms, its own expert width and a dense first layer (mlp_only_layers);
# OLMoE normalises the whole q/k projections and does not renormalise.
FAMILIES = {
    'mixtral': ('MixtralConfig', 'MixtralForCausalLM',
                dict(intermediate_size=48, num_local_experts=4, rope_theta=1e6)),
    'qwen3_moe': ('Qwen3MoeConfig', 'Qwen3MoeForCausalLM',
                  dict(intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                       head_dim=8, norm_topk_prob=True, mlp_only_layers=[0])),
    'olmoe': ('OlmoeConfig', 'OlmoeForCausalLM',
              dict(intermediate_size=24, num_experts=8, norm_topk_prob=False)),
    'qwen2_moe': ('Qwen2MoeConfig', 'Qwen2MoeForCausalLM',
                  dict(intermediate_size=40, moe_intermediate_size=16, num_experts=6,
                       shared_expert_intermediate_size=24, decoder_sparse_step=1,
                       mlp_only_layers=[1], norm_topk_prob=False)),
    # DeepSeek: MLA (V2 without a query latent, as V2-Lite), interleaved rotary dims, shared
    # experts, a dense first layer; V2 softmax group-limited by the group max and scaled; V3
    # sigmoid with e_score_correction_bias, groups by the top-2 sum, renormalised and scaled.
    'deepseek_v2': ('DeepseekV2Config', 'DeepseekV2ForCausalLM',
                    dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                         n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                         q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                         n_group=2, topk_group=1, topk_method='group_limited_greedy',
                         routed_scaling_factor=1.5, num_key_value_heads=4)),
    'deepseek_v3': ('DeepseekV3Config', 'DeepseekV3ForCausalLM', _V3),
    # DeepSeek-V3.2: V3 with a lightning indexer of 8 heads choosing 5 keys per query (of up
    # to 12: the choice matters from the 6th token on); GLM-5 the same with the indexer's
    # rotary pairs interleaved, 6 keys.
    'deepseek_v32': ('DeepseekV32Config', 'DeepseekV32ForCausalLM',
                     dict(_V3, index_topk=5, index_n_heads=8, index_head_dim=12)),
    'glm_moe_dsa': ('GlmMoeDsaConfig', 'GlmMoeDsaForCausalLM',
                    dict(_V3, index_topk=6, index_n_heads=8, index_head_dim=12,
                         mlp_layer_types=['dense', 'sparse', 'sparse'])),
    # Llama 4: top-1 sigmoid gate on the expert's input + a shared expert, MoE every other
    # layer, dense layers of their own width; NoPE on layer 3 with temperature-tuned queries,
    # chunks of 4 positions with L2-normalised q/k on the others; llama3 rotary scaling.
    'llama4_text': ('Llama4TextConfig', 'Llama4ForCausalLM',
                    dict(num_hidden_layers=4, intermediate_size=16, intermediate_size_mlp=48,
                         num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
                         head_dim=8, attention_chunk_size=4, floor_scale=4, attn_scale=0.5,
                         rope_parameters={'rope_theta': 5e5, 'rope_type': 'llama3',
                                          'factor': 8.0, 'low_freq_factor': 1.0,
                                          'high_freq_factor': 4.0,
                                          'original_max_position_embeddings': 16})),
    # gpt-oss: windows of 4 on alternate layers (12 tokens cross them), attention sinks,
    # biases on attention, router and experts, gate/up interleaved in one stacked tensor, the
    # clamped gate at a limit that bites at these scales, yarn rotary scaling.
    'gpt_oss': ('GptOssConfig', 'GptOssForCausalLM',
                dict(intermediate_size=16, num_local_experts=4, head_dim=8, sliding_window=4,
                     swiglu_limit=1.5,
                     rope_parameters={'rope_type': 'yarn', 'rope_theta': 1.5e5, 'factor': 8.0,
                                      'beta_fast': 32.0, 'beta_slow': 1.0, 'truncate': False,
                                      'original_max_position_embeddings': 32})),
    # FlexOlmo: norms after each sublayer (not before), q/k norms over the whole projection.
    'flex_olmo': ('FlexOlmoConfig', 'FlexOlmoForCausalLM',
                  dict(intermediate_size=16, num_experts=6, norm_topk_prob=False)),
    # Granite MoE: multipliers on the embeddings, residual branches, attention scores and
    # logits; the experts as stacked Linear weights [N, 2F, D].
    'granitemoe': ('GraniteMoeConfig', 'GraniteMoeForCausalLM',
                   dict(intermediate_size=16, num_local_experts=4, embedding_multiplier=3.0,
                        residual_multiplier=0.5, attention_multiplier=0.2,
                        logits_scaling=4.0)),
    # dots.llm1: DeepSeek-V3's routing (sigmoid, groups by their top-2 sum, a selection bias,
    # shared experts, a dense first layer) with GQA and per-head q/k norms.
    'dots1': ('Dots1Config', 'Dots1ForCausalLM',
              dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                   n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                   norm_topk_prob=True, routed_scaling_factor=2.5)),
    # GLM-4.5 (glm4_moe): the same routing, half of each head rotated, q/k/v biases, per-head
    # q/k norms; heads of 16 (not hidden / heads = 8): 8 dims rotated.
    'glm4_moe': ('Glm4MoeConfig', 'Glm4MoeForCausalLM',
                 dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                      n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                      routed_scaling_factor=2.5, attention_bias=True, use_qk_norm=True,
                      head_dim=16, rope_parameters={'rope_type': 'default', 'rope_theta': 1e4,
                                                   'partial_rotary_factor': 0.5})),
    # Checkpoints transformers runs with GLM-4.5's and DeepSeek-V3's code, under their own
    # config classes (own defaults): Sarvam-30B and Param-2 (whole heads rotated, q/k norms; their
    # own tensor names, q/k/v in one tensor; Sarvam with q/k/v biases, Param-2 with two dense
    # layers and tied embeddings), Sarvam-105B (MLA without a query latent). Solar Open: GLM-4.5's routing in
    # every layer (no dense layer), no q/k norms, grouped routing here (2 groups of 4).
    'sarvam_moe': ('SarvamMoEConfig', 'Glm4MoeForCausalLM',
                   dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                        n_shared_experts=1, first_k_dense_replace=1, head_dim=8,
                        attention_bias=True)),
    'param2moe': ('Param2MoeConfig', 'Glm4MoeForCausalLM',
                  dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                       n_shared_experts=2, num_hidden_layers=4, first_k_dense_replace=2,
                       head_dim=16)),  # tied embeddings (Param-2's default)
    'sarvam_mla': ('SarvamMLAConfig', 'DeepseekV3ForCausalLM',
                   dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                        num_key_value_heads=4, routed_scaling_factor=2.0)),
    'solar_open': ('SolarOpenConfig', 'SolarOpenForCausalLM',
                   dict(moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
                        n_group=2, topk_group=1, head_dim=8, routed_scaling_factor=1.5)),
    # GLM-4.7-Flash: DeepSeek-V3's MLA (with a query latent) and routing; MoE layers by kind
    # (dense, sparse, dense, sparse: not a first-K-dense schedule with frequency 1).
    'glm4_moe_lite': ('Glm4MoeLiteConfig', 'Glm4MoeLiteForCausalLM',
                      dict(num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=16,
                           n_routed_experts=8, n_shared_experts=1, kv_lora_rank=16,
                           q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4,
                           v_head_dim=8, n_group=2, topk_group=1, num_key_value_heads=4,
                           routed_scaling_factor=1.5,
                           mlp_layer_types=['dense', 'sparse', 'dense', 'sparse'])),
    # Flint: attention sinks, windows of 4 on layers 1 and 2 with rotary embedding there only
    # (layer 0 is full attention and has no positions), per-head q/k norms, sigmoid scores
    # renormalised, an ungated shared expert of its own width, a dense first layer.
    'flint': ('FlintConfig', 'FlintForCausalLM',
              dict(intermediate_size=48, moe_intermediate_size=16, num_experts=6, head_dim=8,
                   shared_expert_intermediate_size=24, mlp_only_layers=[0], sliding_window=4,
                   layer_types=['full_attention', 'sliding_attention', 'sliding_attention'])),
    # EXAONE-MoE: windows of 4 on layers 0 and 1, rotary embedding there only; DeepSeek-V3's
    # routing (sigmoid, 2 groups, a selection bias, a shared expert) after a dense first layer.
    'exaone_moe': ('ExaoneMoeConfig', 'ExaoneMoeForCausalLM',
                   dict(intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                        num_shared_experts=1, head_dim=8, n_group=2, topk_group=1,
                        sliding_window=4, routed_scaling_factor=1.5,
                        layer_types=['sliding_attention', 'sliding_attention', 'full_attention'],
                        mlp_layer_types=['dense', 'sparse', 'sparse'])),
    # Hunyuan 3: per-head q/k norms, biases on the four attention projections, sigmoid scores
    # with a selection bias beside the router, renormalised and scaled, a shared expert.
    'hy_v3': ('HYV3Config', 'HYV3ForCausalLM',
              dict(intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                   num_shared_experts=1, head_dim=8, router_scaling_factor=1.5,
                   attention_bias=True, mlp_layer_types=['dense', 'sparse', 'sparse'])),
    # AFMoE: windows of 4 on layers 0 and 1 (rotary there only), sigmoid output gates, norms
    # around each sublayer, a selection bias beside the router, 2 shared experts, a dense first
    # layer, muP input scaling.
    'afmoe': ('AfmoeConfig', 'AfmoeForCausalLM',
              dict(intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                   num_shared_experts=2, num_dense_layers=1, head_dim=8, sliding_window=4,
                   route_scale=1.5, mup_enabled=True,
                   layer_types=['sliding_attention', 'sliding_attention', 'full_attention'])),
    # Aria's language model: grouped expert matrices, two shared experts, biased attention.
    'aria_text': ('AriaTextConfig', 'AriaTextForCausalLM',
                  dict(intermediate_size=16, moe_num_experts=6, moe_topk=2, head_dim=8,
                       moe_num_shared_experts=2, attention_bias=True)),
    # Granite MoE with a shared expert beside the MoE block: its gate and up in one Linear.
    'granitemoeshared': ('GraniteMoeSharedConfig', 'GraniteMoeSharedForCausalLM',
                         dict(intermediate_size=16, num_local_experts=4, embedding_multiplier=3.0,
                              residual_multiplier=0.5, attention_multiplier=0.2,
                              logits_scaling=4.0, shared_intermediate_size=24)),
    # MiniCPM 5 MoE: the output gate inside the query projection, DeepSeek-V3's routing.
    'minicpm5_moe': ('MiniCPM5MoeConfig', 'MiniCPM5MoeForCausalLM',
                     dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                          n_shared_experts=1, head_dim=8, n_group=2, topk_group=1,
                          routed_scaling_factor=1.5,
                          mlp_layer_types=['dense', 'sparse', 'sparse'])),
    # Kolibri 1: windows of 4 on layers 0 and 1 (rotary there only), sandwich norms, experts
    # chosen on the logits plus a selection bias, an ungated shared expert, not renormalised.
    'kolibri1': ('Kolibri1Config', 'Kolibri1ForCausalLM',
                 dict(moe_intermediate_size=16, num_experts=6, head_dim=8,
                      shared_expert_intermediate_size=24, sliding_window=4,
                      layer_types=['sliding_attention', 'sliding_attention', 'full_attention'])),
    # The language models of two vision-language models, built inside them (MULTIMODAL) and
    # read from their checkpoints: Qwen3-VL-MoE's (its experts stacked as the published
    # checkpoints hold them, [N, D, 2F]) and GLM-4.5V's (q/k/v biases, half of each head
    # rotated, DeepSeek-V3's routing).
    'qwen3_vl_moe_text': ('Qwen3VLMoeTextConfig', 'Qwen3VLMoeForConditionalGeneration',
                          dict(intermediate_size=48, moe_intermediate_size=12, num_experts=6,
                               head_dim=8, mlp_only_layers=[0], tie_word_embeddings=False)),
    'glm4v_moe_text': ('Glm4vMoeTextConfig', 'Glm4vMoeForConditionalGeneration',
                       dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                            n_shared_experts=1, first_k_dense_replace=1, n_group=2,
                            topk_group=1, head_dim=16, routed_scaling_factor=1.5,
                            rope_parameters={'rope_type': 'default', 'rope_theta': 1e4,
                                             'partial_rotary_factor': 0.5,
                                             'mrope_section': [1, 1, 2]})),
    # Qwen3-Next: Gated DeltaNet on layers 0 and 2 (q, k, v, z fused per key head; two value
    # heads per key head), gated attention on layer 1 (half of each head rotated), norms
    # stored zero-centred, a sigmoid-gated shared expert, layer 1 dense (mlp_only_layers).
    'qwen3_next': ('Qwen3NextConfig', 'Qwen3NextForCausalLM',
                   dict(intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                        head_dim=8, shared_expert_intermediate_size=24, mlp_only_layers=[1],
                        norm_topk_prob=True, **_LINEAR,
                        layer_types=['linear_attention', 'full_attention', 'linear_attention'],
                        rope_parameters={'rope_type': 'default', 'rope_theta': 1e4,
                                         'partial_rotary_factor': 0.5})),
    # Qwen3.5-MoE's language model, read from its multimodal checkpoint: the same layers with
    # the linear projections apart, MoE in every layer; full attention first this time.
    'qwen3_5_moe_text': ('Qwen3_5MoeTextConfig', 'Qwen3_5MoeForConditionalGeneration',
                         dict(moe_intermediate_size=16, num_experts=6, head_dim=8,
                              shared_expert_intermediate_size=24, **_LINEAR,
                              layer_types=['full_attention', 'linear_attention',
                                           'linear_attention'],
                              tie_word_embeddings=False,
                              rope_parameters={'rope_type': 'default', 'rope_theta': 1e4,
                                               'partial_rotary_factor': 0.5,
                                               'mrope_section': [1, 1, 0]})),
    # Lara Mini: a Gated DeltaNet layer (its six projections in one in_proj), a windowed layer
    # that rotates, a full-attention layer without positions; stacked experts ([N, 2F, D] with
    # 2F != D), an ungated shared expert, tied embeddings.
    'lara_mini': ('LaraMiniConfig', 'LaraMiniForCausalLM',
                  dict(moe_intermediate_size=12, num_experts=6, head_dim=8,
                       shared_expert_intermediate_size=24, sliding_window=4, **_LINEAR,
                       layer_types=['linear_attention', 'sliding_attention', 'full_attention'])),
    # Hunyuan-A13B: q/k norms after the rotation (not before), a shared expert, top-K
    # renormalised; the router a module of its own (mlp.gate.wg).
    'hunyuan_v1_moe': ('HunYuanMoEV1Config', 'HunYuanMoEV1ForCausalLM',
                       dict(intermediate_size=16, num_experts=6, moe_topk=2, head_dim=8)),
    # MiniMax-M2: sigmoid scores with a selection bias kept beside the router, renormalised,
    # q/k norms over the whole projection, half of each head rotated.
    'minimax_m2': ('MiniMaxM2Config', 'MiniMaxM2ForCausalLM',
                   dict(intermediate_size=16, num_local_experts=6, head_dim=8,
                        rope_parameters={'rope_type': 'default', 'rope_theta': 1e4,
                                         'partial_rotary_factor': 0.5})),
    # ERNIE 4.5: softmax scores with a selection bias stored [1, N], renormalised; MoE layers
    # by start index and interval (layers 1 and 3 of 4: where (i + 1) % 2 == 0, not i % 2);
    # interleaved rotary pairs; tied embeddings.
    'ernie4_5_moe': ('Ernie4_5_MoeConfig', 'Ernie4_5_MoeForCausalLM',
                     dict(num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=16,
                          moe_num_experts=8, moe_k=2, moe_num_shared_experts=1,
                          moe_layer_start_index=1, moe_layer_interval=2)),
    # PhiMoE: LayerNorm, biases on attention and head, SparseMixer routing, longrope (within
    # its original length, where transformers' PhiMoE takes the short factors) and a window.
    'phimoe': ('PhimoeConfig', 'PhimoeForCausalLM',
               dict(intermediate_size=16, num_local_experts=4, attention_bias=True,
                    lm_head_bias=True, sliding_window=5, router_jitter_noise=0.2,
                    rope_parameters={'rope_type': 'longrope', 'rope_theta': 1e4,
                                     'short_factor': [1.0, 1.5, 3.0, 6.0],
                                     'long_factor': [2.0, 4.0, 8.0, 16.0],
                                     'short_mscale': 1.2, 'long_mscale': 1.2,
                                     'original_max_position_embeddings': 64})),
}


# The language models built inside a multimodal model: (its config class, a tiny vision tower).
_VISION = dict(hidden_size=16, depth=1, num_heads=2, intermediate_size=32, out_hidden_size=32,
               patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
MULTIMODAL = {'qwen3_vl_moe_text': ('Qwen3VLMoeConfig', _VISION),
              'glm4v_moe_text': ('Glm4vMoeConfig', _VISION),
              'qwen3_5_moe_text': ('Qwen3_5MoeConfig', _VISION)}


def build(kind: str, folder, **kw):
  cfg_cls, model_cls, extra = FAMILIES[kind]
  torch.manual_seed(0)
  cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra, **kw})
  if kind in MULTIMODAL:  # the language model inside its multimodal model
    outer, vision = MULTIMODAL[kind]
    cfg = getattr(transformers, outer)(text_config=cfg.to_dict(), vision_config=vision)
  model = getattr(transformers, model_cls)(cfg).eval()
  with torch.no_grad():  # random norm scales and biases (not 1 and 0): a misplaced one shows
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.uniform_(0.5, 1.5)
      elif name.endswith('bias'):
        p.uniform_(-0.5, 0.5)
      elif name.endswith('sinks'):  # a per-head logit next to the scores
        p.normal_(0, 1.0)
      elif 'experts.' in name and p.ndim == 3:  # stacked experts start at zero in Llama 4
        p.normal_(0, 0.3)
    for name, b in model.named_buffers():
      if name.endswith('e_score_correction_bias'):  # a real selection bias changes the choice
        b.uniform_(-0.3, 0.3)
  model.save_pretrained(str(folder))
  if kind == 'qwen3_vl_moe_text':  # the published layout of the experts: [N, D, 2F], [N, F, D]
    from safetensors.numpy import load_file, save_file
    path = f'{folder}/model.safetensors'
    tensors = load_file(path)
    save_file({k: np.ascontiguousarray(np.swapaxes(v, 1, 2)) if '.experts.' in k else v
               for k, v in tensors.items()}, path, metadata={'format': 'pt'})
    model = getattr(transformers, model_cls).from_pretrained(str(folder)).eval()  # reads it
  return model


def ids():
  return torch.from_numpy(np.random.default_rng(0).integers(0, 320, (2, 12)))
