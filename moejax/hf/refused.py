"""Every MoE model type transformers has that moejax does not import, and why: the feature it
needs that moejax does not build, in one phrase (import says it in one line). The test
`tests/test_hf_refused.py` enumerates transformers' configs with routed experts and fails on a
type that is neither a family entry (families.py) nor here.

Three kinds of entries:
- MULTIMODAL: a multimodal model's own config; its language model is a model type of its own
  (listed here or a family), imported from a language-model checkpoint.
- NOT_A_LANGUAGE_MODEL: experts in something other than a decoder-only language model.
- NEEDS: a decoder-only language model that needs a feature moejax does not build.
"""
from __future__ import annotations

# A multimodal model type -> the model type of its language model (transformers' text_config).
MULTIMODAL = {
    'deepseek_ocr2': 'deepseek_ocr2_text',
    'diffusion_gemma': 'diffusion_gemma_text',
    'dots3_note': 'dots3_note_text',
    'ernie4_5_vl_moe': 'ernie4_5_vl_moe_text',
    'gemma4': 'gemma4_text',
    'glm5_next': 'glm5_next_text',
    'hy_v4_vl': 'hy_v4_vl_text',
    'inkling2': 'inkling2_text',
    'inkling2_loop': 'inkling2_loop_text',
    'inkling_mm_model': 'inkling_text',
    'kimi_k25': 'deepseek_v3',
    'minimax_m3_vl': 'minimax_m3_vl_text',
    'mistral_large4': 'mistral_large4_text',
    'muse_spark': 'muse_spark_text',
    'nemo_speechlm': 'nemotron_h',
    'nemotron_h_omni': 'nemotron_h',
    'qwen3_omni_moe': 'qwen3_omni_moe_text',  # its thinker's language model
    'qwen3_omni_moe_thinker': 'qwen3_omni_moe_text',
    'qwen4_exp': 'qwen4_exp_text',
    'step3p7': 'step3p5',
    'unlimited_ocr': 'unlimited_ocr_text',
}

NOT_A_LANGUAGE_MODEL = {
    'switch_transformers': 'an encoder-decoder model',
    'nllb-moe': 'an encoder-decoder model',
    'openai_privacy_filter': 'a bidirectional token classifier (an encoder, not a causal '
                             'language model)',
    'vitpose': 'a pose-estimation model (its experts are in a vision backbone)',
    'vitpose_backbone': 'a vision backbone',
    'dots3_note_vision_encoder': 'a vision encoder',
    'diffusion_gemma_text': 'a diffusion language model (an encoder and a denoising decoder, '
                            'not next-token prediction)',
}

_LINEAR = 'linear-attention layers'
NEEDS = {
    # Linear attention and state-space layers between the attention layers.
    'qwen4_exp_text': 'sparse attention over compressed key blocks (QSA)',
    # (its Kimi Delta Attention layers moejax builds: model.linear.decay='channel')
    'kimi_linear': ('a layer layout no repeating pattern gives (a dense first layer inside the '
                    'pattern, the last layer attending) and latent attention without rotation'),
    'bailing_hybrid': f'{_LINEAR} (a delta rule with a forget gate)',
    'minimax': f'{_LINEAR} (lightning attention)',
    'minimax_m3_vl_text': f'{_LINEAR} and an indexer of its own kind',
    'glm5_next_text': f'{_LINEAR}, an indexer over pooled keys and hyper-connections (several '
                      'residual streams)',
    'granitemoehybrid': 'Mamba-2 layers',
    'jamba': 'Mamba layers',
    'nemotron_h': 'Mamba-2 layers',
    'lfm2_moe': 'short-convolution layers',
    # Sparse attention beyond DeepSeek's (whose indexer moejax builds), or beside more.
    'axk2': 'RMSNorms gated by a low-rank sigmoid MLP and a query projection fused with an output '
            'gate',
    'dots3_note_text': 'an output gate and a norm of the rotary key alone in latent attention',
    'mistral_large4_text': 'an indexer whose queries come from the block input (no query latent)',
    'kolibri1_1': 'a weightless indexer (query heads against key head 0) and key-value states '
                  'shared across layers',
    'deepseek_v4': 'hyper-connections (several residual streams) and compressed sparse '
                   'attention',
    'hy_v4': 'hyper-connections (several residual streams)',
    'hy_v4_vl_text': 'hyper-connections (several residual streams) and multi-section rotary '
                     'positions',
    # Other attention or block structures.
    'longcat_flash': 'shortcut-connected MoE blocks (two attention sublayers per layer) and '
                     'zero-computation experts',
    'jetmoe': 'mixture-of-attention-heads layers',
    'cohere2_moe': 'parallel attention and FFN sublayers (one residual update from both)',
    'dbrx': 'clipped q/k/v projections (clip_qkv) and LayerNorm without a bias',
    'doge': 'dynamic-mask attention and product-key retrieval over many tiny experts (CDMoE)',
    'zaya': 'compressed convolutional attention (CCA) and an MLP router',
    'ergo': 'gated residual connections and a norm per expert',
    'mistral4': 'a position-dependent query scale on every layer (llama_4_scaling_beta)',
    'axk1': 'an RMSNorm on the MoE block\'s output (MoE layers only)',
    'beam': 'soft-capped output logits (final_logit_softcapping)',
    'laguna': 'a head count per layer, softplus attention output gates and soft-capped router '
              'logits',
    'mellum': 'a rotary base per attention kind (sliding and full layers rotate differently)',
    'mimo_v2_flash': 'value heads narrower than the query/key heads, a rotary base per attention '
                     'kind and attention sinks on the windowed layers only',
    'step3p5': 'a different head count on the windowed layers (num_sliding_attention_heads)',
    'muse_spark_text': 'soft-capped output logits, gated residual connections and a rotary base '
                       'per layer (layer_rope_theta)',
    'inkling_text': 'a different head count and size on the windowed layers, relative-position '
                    'logits and short convolutions',
    'inkling2_text': 'relative-position biases, short convolutions and soft-capped attention',
    'inkling2_loop_text': 'looped layers with message attention, relative-position biases and '
                          'short convolutions',
    'gemma4_text': 'GELU-gated FFNs, per-layer input embeddings and a head size per layer',
    'granitemoe_swa': 'a rotary base per layer (layer_rope_theta)',
    'ernie4_5_vl_moe_text': 'separate text and vision experts per layer and 3-D rotary '
                            'positions',
    'qwen3_omni_moe_text': 'multi-section rotary positions (MRoPE) and visual features added '
                           'in the first layers (deepstack)',
    'qwen3_omni_moe_talker_text': 'a speech-token decoder conditioned on the thinker\'s hidden '
                                  'states (not a text language model)',
    'deepseek_ocr2_text': 'its tensors read from inside an OCR checkpoint (transformers has no '
                          'causal language model of its own for it)',
    'unlimited_ocr_text': 'its tensors read from inside an OCR checkpoint (transformers has no '
                          'causal language model of its own for it)',
}


TABLES = (MULTIMODAL, NOT_A_LANGUAGE_MODEL, NEEDS)


def reason(model_type: str) -> str | None:
  """Why moejax does not import `model_type` (None: not listed here)."""
  if model_type in MULTIMODAL:
    text = MULTIMODAL[model_type]
    why = reason(text)
    return (f'a multimodal model; its language model is model_type {text!r}' +
            (f' ({why})' if why else ', which moejax imports from a checkpoint of its own, '
             'not yet from inside this one'))
  if model_type in NOT_A_LANGUAGE_MODEL:
    return f'{NOT_A_LANGUAGE_MODEL[model_type]}, not a decoder-only language model'
  if model_type in NEEDS:
    return f'it needs {NEEDS[model_type]}, which moejax does not build'
  return None
