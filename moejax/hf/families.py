"""The Hugging Face MoE families moejax imports and exports: one table entry each.

An entry says how the family's config.json maps to moejax config fields (`config`: Keys,
Consts and shared rules from rules.py), which moejax fields every model of the family has
(`fixed`), and where its tensors live (module names and the experts' layout; the tensor names
of each feature are in weights.py). Import and export both read the entry: import turns a
config.json into fields; export writes a config.json from a model config, then reads it back
through the same entry and refuses, naming the field, any model the family cannot express.
The model itself has only general features; no family is named outside this file.

Adding a family that recombines features moejax has is one entry here (and a tiny model in
tests/hf_models.py).
"""
from __future__ import annotations

import dataclasses

from moejax.errors import ConfigError
from moejax.hf import refused
from moejax.hf.rules import (AttentionBias, Const, IndexedLayers, Key, LatentHeads, LinearLayers,
                             MupInput, NopeLayers, Rope, Schedule, SharedExpert, SlidingLayers,
                             TopkMethod, moe_layers)

__all__ = ['FAMILIES', 'Family', 'family', 'model_fields', 'hf_config', 'moe_layers']


PER_EXPERT = tuple(f'experts.{{e}}.{p}_proj.weight' for p in ('gate', 'up', 'down'))
STACKED = ('experts.gate_up_proj', 'experts.gate_up_proj', 'experts.down_proj')


@dataclasses.dataclass(frozen=True)
class Family:
  """One Hugging Face family.

  config: the pieces mapping config.json <-> moejax fields, read and written in order.
  fixed: (field, value) that every model of the family has (import sets, export requires).
  Tensors, under model.layers.N: the MoE block `moe_module` holds the router `router` and the
  experts, named by expert_names (gate, up, down; {e} stands for the expert) and laid out as
  `experts` says: 'per_expert' (one Linear each, [out, in]), 'stacked' (one tensor for all,
  gate_up [N, D, 2F] and down [N, F, D]) or 'stacked_linear' (stacked Linear weights, gate_up
  [N, 2F, D] and down [N, D, F]); in a stacked gate_up, gate and up are `gate_up`: 'halves'
  or 'interleaved' (alternate columns). Biases sit next to their weights (x.bias, or x_bias
  for a stacked x). The shared expert is `shared_module`; a dense layer's FFN `dense_module`;
  the q/k norms self_attn's `qk_norm_names`; a language model that transformers runs only inside
  its multimodal model exports as the family `exports_as`; `shared_beside` puts the shared expert under the
  layer, not the MoE block, and `shared_fused` reads it as one Linear of gate and up rows
  (input_linear) and output_linear. A family whose checkpoints keep their own code's
  tensor names (transformers renames them at load) says how: `tensor_names` replaces parts of
  transformers' names in order, `fused_qkv` names one tensor of q, k and v rows.
  zero_centred_norms: the checkpoints store every RMSNorm scale (but the Gated DeltaNet
  layer's gated norm) as w with the norm computing x * (1 + w); moejax's scale is w + 1.
  linear_layout: where a Gated DeltaNet layer's (linear_attn) projections are: 'per_key_head'
  (in_proj_qkvz and in_proj_ba, grouped per key head), 'split' (in_proj_qkv, _z, _b, _a) or
  'fused' (in_proj: rows q, k, v, z, b, a).
  rope_pairs: the q/k rotary dims' order in the checkpoint, 'halves' (moejax's), 'interleaved'
  (reordered at import), or a config.json key saying whether they are interleaved (true when
  absent; export writes false). mtp_key: the config.json key of the
  multi-token-prediction depth, if the family has one. selection_bias: where a fixed selection
  bias lives in the MoE block ('': the router's e_score_correction_bias), [1, N] if
  selection_bias_2d. absent: what transformers reads for a key the config.json leaves out,
  where the family's default differs from the shared one (rotary settings as top-level
  rope_theta / partial_rotary_factor / rope_scaling, read under an explicit rope_parameters).
  renamed: {key: transformers' key} for config.json keys that a family's original checkpoints
  spell their own way (transformers' attribute_map for them), read as transformers' keys.
  """
  model_type: str
  architecture: str
  config: tuple
  fixed: tuple = ()
  moe_module: str = 'mlp'
  router: str = 'gate'
  experts: str = 'per_expert'
  gate_up: str = 'halves'
  expert_names: tuple = PER_EXPERT
  shared_module: str = 'shared_expert'
  dense_module: str = 'mlp'
  rope_pairs: str = 'halves'
  mtp_key: str = ''
  selection_bias: str = ''  # the fixed selection bias's tensor in the MoE block ('': router's)
  selection_bias_2d: bool = False  # stored as [1, N]
  absent: dict = dataclasses.field(default_factory=dict)  # what a missing key means here
  renamed: dict = dataclasses.field(default_factory=dict)  # original key -> transformers' key
  qk_norm_names: tuple = ('q_norm', 'k_norm')  # the q/k norms' modules in self_attn
  fused_qkv: str = ''  # a self_attn module holding [q; k; v] rows in one tensor, if any
  query_gate: bool = False  # the attention output gate inside q_proj (per head: query, gate)
  exports_as: str = ''  # the family export writes (one transformers loads as a causal LM)
  shared_beside: bool = False  # the shared expert beside the MoE block, not inside it
  shared_fused: bool = False  # the shared expert as input_linear [2F, D] (gate; up), output_linear
  tensor_names: tuple = ()  # (transformers' name part, the checkpoints' own), in order
  zero_centred_norms: bool = False  # RMSNorms compute x * (1 + w): moejax's scale is w + 1
  linear_layout: str = ''  # Gated DeltaNet tensors: 'per_key_head', 'split' or 'fused'
  index_rope_pairs: str = 'halves'  # the sparse-attention indexer's rotary dims: or 'interleaved'

  def interleaved(self, hf: dict) -> bool:
    """Whether the checkpoint's rotary dims are interleaved pairs."""
    if self.rope_pairs in ('halves', 'interleaved'):
      return self.rope_pairs == 'interleaved'
    return bool(hf.get(self.rope_pairs, True))


def _without(pieces: tuple, *keys: str) -> tuple:
  """The pieces but the Keys of these config.json keys (a family that spells them its way)."""
  return tuple(p for p in pieces if getattr(p, 'hf', None) not in keys)


def _heads(hf):
  return hf['num_attention_heads']


def _head_dim(hf):
  return hf['hidden_size'] // hf['num_attention_heads']


def _one_per_model(key: str):
  """A count that a config.json may give per layer (a list): one value for every layer."""
  def check(value):
    if isinstance(value, (list, tuple)):
      if len(set(value)) != 1:
        raise ConfigError(f'{key}={list(value)}: a different value per layer is not supported')
      value = value[0]
    return value
  return check


# The keys of every family with grouped-query attention (the shape, norms, top-K).
SHAPE = (
    Key('vocab_size', 'model.vocab_size'), Key('hidden_size', 'model.d_model'),
    Key('num_hidden_layers', 'model.num_layers'),
    Key('num_attention_heads', 'model.num_heads'),
    Key('max_position_embeddings', 'model.max_seq_len', 4096),
    Key('rms_norm_eps', 'model.norm_eps', 1e-6),
    Key('num_experts_per_tok', 'model.moe.num_experts_per_tok'),
    Key('router_aux_loss_coef', 'model.moe.balance.aux_loss_weight', 0.0, float),
    Const('hidden_act', 'silu', 'only SiLU-gated FFNs'),
    Rope(),
)
GQA = SHAPE + (
    Key('num_key_value_heads', 'model.num_kv_heads', _heads),
    Key('head_dim', 'model.head_dim', _head_dim),
)
NO_ATTENTION_BIAS = Const('attention_bias', False, 'biased attention projections: gpt_oss '
                          'has them', absent=False)
NORM_TOPK = Key('norm_topk_prob', 'model.moe.router.norm_topk_prob', False, bool)
SPARSE_STEP = (Key('intermediate_size', 'model.ffn_dim'),
               Key('moe_intermediate_size', 'model.moe.expert_ffn_dim'),
               Key('num_experts', 'model.moe.num_experts', aliases=('num_local_experts',)),
               Schedule('sparse_step'))
def _shared_and_routed(scale_key: str) -> tuple:
  """The keys of fine-grained and shared experts as the newer families spell them (plainly:
  num_experts, num_shared_experts; the routed weights' scale under `scale_key`)."""
  return (Key('intermediate_size', 'model.ffn_dim'),
          Key('moe_intermediate_size', 'model.moe.expert_ffn_dim'),
          Key('num_experts', 'model.moe.num_experts'),
          Key('num_shared_experts', 'model.moe.num_shared_experts', 0),
          Key(scale_key, 'model.moe.router.routed_scaling_factor', 1.0, float))


# Sigmoid scores with a fixed selection bias, renormalised (where a family has no routing keys).
SIGMOID_BIASED = (('model.moe.router.score_fn', 'sigmoid'),
                  ('model.moe.router.norm_topk_prob', True),
                  ('model.moe.balance.selection_bias', True))
# Fine-grained and shared experts as DeepSeekMoE spells them (and the families after it): the
# dense layers' width, the experts' width, the routed and shared experts, the weights' scale.
FINE_GRAINED = (
    Key('intermediate_size', 'model.ffn_dim'),
    Key('moe_intermediate_size', 'model.moe.expert_ffn_dim'),
    Key('n_routed_experts', 'model.moe.num_experts'),
    Key('n_shared_experts', 'model.moe.num_shared_experts', 0),
    Key('routed_scaling_factor', 'model.moe.router.routed_scaling_factor', 1.0, float))
# (DeepSeek's routing keys carry the aux loss's weight: aux_loss_alpha, in TopkMethod.)
LATENT = _without(SHAPE, 'router_aux_loss_coef') + FINE_GRAINED + (
    LatentHeads(),
    Key('q_lora_rank', 'model.mla.q_lora_rank', 0, to_hf=lambda r, m: r or None),
    Key('kv_lora_rank', 'model.mla.kv_lora_rank'),
    Key('qk_nope_head_dim', 'model.mla.qk_nope_head_dim'),
    Key('qk_rope_head_dim', 'model.mla.qk_rope_head_dim'),
    Key('v_head_dim', 'model.mla.v_head_dim'),
    Const('mlp_bias', False, 'biased FFN projections', absent=False), NO_ATTENTION_BIAS)

# The routed experts' count and width where every layer is MoE (no dense width).
ROUTED = (Key('moe_intermediate_size', 'model.moe.expert_ffn_dim'),
          Key('num_experts', 'model.moe.num_experts'))
# transformers' defaults of the Gated DeltaNet keys (Qwen3-Next's and Qwen3.5's).
LINEAR_DEFAULTS = dict(linear_conv_kernel_dim=4, linear_key_head_dim=128,
                       linear_value_head_dim=128, linear_num_key_heads=16,
                       linear_num_value_heads=32)

FAMILIES = {f.model_type: f for f in (
    Family('mixtral', 'MixtralForCausalLM', GQA + (
        Key('num_local_experts', 'model.moe.num_experts'),
        Key('intermediate_size', 'model.moe.expert_ffn_dim'),
        Key('router_jitter_noise', 'model.moe.router.jitter', 0.0, float),
        NO_ATTENTION_BIAS, SlidingLayers(), Schedule('every')),
        fixed=(('model.moe.router.norm_topk_prob', True),),
        moe_module='block_sparse_moe',
        expert_names=tuple(f'experts.{{e}}.{w}.weight' for w in ('w1', 'w3', 'w2')),
        absent=dict(max_position_embeddings=131072, num_key_value_heads=8, rms_norm_eps=1e-5,
                    rope_theta=1e6, router_aux_loss_coef=0.001)),
    Family('qwen3_moe', 'Qwen3MoeForCausalLM', GQA + SPARSE_STEP + (
        NORM_TOPK, NO_ATTENTION_BIAS, SlidingLayers(switch='use_sliding_window')),
        fixed=(('model.qk_norm', 'head'),),
        absent=dict(max_position_embeddings=32768, num_key_value_heads=4,
                    router_aux_loss_coef=0.001)),
    Family('olmoe', 'OlmoeForCausalLM', GQA + (
        Key('num_experts', 'model.moe.num_experts', aliases=('num_local_experts',)),
        Key('intermediate_size', 'model.moe.expert_ffn_dim'),
        Key('router_z_loss_coef', 'model.moe.balance.z_loss_weight', 0.0, float),
        NORM_TOPK, NO_ATTENTION_BIAS, Const('clip_qkv', None, 'clipped q/k/v'),
        Schedule('every')),
        fixed=(('model.qk_norm', 'full'),),
        absent=dict(rms_norm_eps=1e-5, router_aux_loss_coef=0.01)),
    Family('qwen2_moe', 'Qwen2MoeForCausalLM', GQA + SPARSE_STEP + (
        NORM_TOPK, Key('qkv_bias', 'model.qkv_bias', True, bool), NO_ATTENTION_BIAS,
        SharedExpert(), SlidingLayers(layer_types=True, switch='use_sliding_window')),
        absent=dict(max_position_embeddings=32768, num_key_value_heads=16,
                    router_aux_loss_coef=0.001, shared_expert_intermediate_size=5632)),
    Family('deepseek_v2', 'DeepseekV2ForCausalLM', LATENT + (
        TopkMethod('softmax', 'greedy'), Schedule('first_k_dense')),
        fixed=(('model.attention', 'mla'), ('model.moe.router.norm_topk_prob', False)),
        shared_module='shared_experts', rope_pairs='interleaved',
        absent=dict(max_position_embeddings=2048, n_shared_experts=2, q_lora_rank=1536)),
    Family('deepseek_v3', 'DeepseekV3ForCausalLM', LATENT + (
        NORM_TOPK, TopkMethod('sigmoid', 'noaux_tc'), Schedule('first_k_dense')),
        fixed=(('model.attention', 'mla'),),
        shared_module='shared_experts', rope_pairs='rope_interleave',
        mtp_key='num_nextn_predict_layers',
        absent=dict(first_k_dense_replace=3, n_group=8, topk_group=4, n_shared_experts=1,
                    norm_topk_prob=True, q_lora_rank=1536, routed_scaling_factor=2.5)),
    # GLM-4.7-Flash: DeepSeek-V3's latent attention and routing, without multi-token
    # prediction; which layers are MoE by each layer's kind.
    Family('glm4_moe_lite', 'Glm4MoeLiteForCausalLM', LATENT + (
        NORM_TOPK, TopkMethod('sigmoid', 'noaux_tc'), Schedule('mlp_layer_types')),
        fixed=(('model.attention', 'mla'),),
        shared_module='shared_experts', rope_pairs='rope_interleave',
        absent=dict(first_k_dense_replace=1, max_position_embeddings=202752, n_shared_experts=1,
                    norm_topk_prob=True, q_lora_rank=768, rms_norm_eps=1e-5,
                    routed_scaling_factor=1.8)),
    # DeepSeek-V3.2: DeepSeek-V3 with a lightning indexer selecting each query's keys
    # (DeepSeek Sparse Attention; its rotary dims in halves, the attention's interleaved).
    Family('deepseek_v32', 'DeepseekV32ForCausalLM', LATENT + (
        NORM_TOPK, TopkMethod('sigmoid', 'noaux_tc'), Schedule('mlp_layer_types'),
        IndexedLayers()),
        fixed=(('model.attention', 'mla'),),
        shared_module='shared_experts', rope_pairs='interleaved',
        absent=dict(first_k_dense_replace=3, index_head_dim=128, index_n_heads=64,
                    index_topk=2048, max_position_embeddings=163840, n_group=8, topk_group=4,
                    n_shared_experts=1, norm_topk_prob=True, q_lora_rank=1536,
                    routed_scaling_factor=2.5)),
    # GLM-5: the same sparse attention (the indexer's rotary dims interleaved too), every layer
    # running its own indexer; MoE layers by each layer's kind.
    Family('glm_moe_dsa', 'GlmMoeDsaForCausalLM', LATENT + (
        NORM_TOPK, TopkMethod('sigmoid', 'noaux_tc'), Schedule('mlp_layer_types'),
        IndexedLayers(per_layer='indexer_types')),
        fixed=(('model.attention', 'mla'),),
        shared_module='shared_experts', rope_pairs='interleaved', index_rope_pairs='interleaved',
        absent=dict(first_k_dense_replace=3, index_head_dim=128, index_n_heads=32,
                    index_topk=2048, max_position_embeddings=202752, n_group=1, topk_group=1,
                    n_shared_experts=1, norm_topk_prob=True, q_lora_rank=2048, rms_norm_eps=1e-5,
                    routed_scaling_factor=2.5)),
    Family('llama4_text', 'Llama4ForCausalLM', GQA + (
        Key('num_local_experts', 'model.moe.num_experts'),
        Key('intermediate_size', 'model.moe.expert_ffn_dim'),
        Key('intermediate_size_mlp', 'model.ffn_dim', lambda hf: hf['intermediate_size']),
        Key('use_qk_norm', 'model.qk_norm', False, lambda v: 'l2' if v else 'none',
            lambda v, m: v == 'l2'),
        NO_ATTENTION_BIAS, NopeLayers(), Schedule('layer_list')),
        fixed=(('model.moe.num_shared_experts', 1), ('model.moe.router.score_fn', 'sigmoid'),
               ('model.moe.router.norm_topk_prob', False), ('model.moe.gate_input', True)),
        moe_module='feed_forward', router='router', experts='stacked', expert_names=STACKED,
        dense_module='feed_forward', rope_pairs='interleaved',
        absent=dict(attention_chunk_size=8192, attn_temperature_tuning=True, head_dim=128,
                    intermediate_size_mlp=16384, max_position_embeddings=131072,
                    num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=5e5,
                    router_aux_loss_coef=0.001, use_qk_norm=True)),
    Family('gpt_oss', 'GptOssForCausalLM', GQA + (
        Key('num_local_experts', 'model.moe.num_experts'),
        Key('intermediate_size', 'model.moe.expert_ffn_dim'),
        Key('swiglu_alpha', 'model.moe.experts.alpha', 1.702, float),
        Key('swiglu_limit', 'model.moe.experts.limit', 7.0, float),
        Const('attention_bias', True, 'gpt_oss always biases its attention projections'),
        SlidingLayers(layer_types=True), Schedule('every')),
        fixed=(('model.qkv_bias', True), ('model.attention_out_bias', True),
               ('model.attention_sinks', True), ('model.moe.router.logit_bias', True),
               ('model.moe.experts.name', 'glu'), ('model.moe.experts.bias', True),
               ('model.moe.experts.up_offset', 1.0)),
        router='router', experts='stacked', gate_up='interleaved', expert_names=STACKED,
        absent=dict(head_dim=64, max_position_embeddings=131072, num_key_value_heads=8,
                    rms_norm_eps=1e-5, router_aux_loss_coef=0.001, sliding_window=128,
                    rope_theta=1.5e5, rope_scaling={
                        'rope_type': 'yarn', 'factor': 32.0, 'beta_fast': 32.0,
                        'beta_slow': 1.0, 'truncate': False,
                        'original_max_position_embeddings': 4096})),
    Family('flex_olmo', 'FlexOlmoForCausalLM', GQA + (
        Key('num_experts', 'model.moe.num_experts', aliases=('num_local_experts',)),
        Key('intermediate_size', 'model.moe.expert_ffn_dim'),
        NORM_TOPK, NO_ATTENTION_BIAS, Schedule('every')),
        fixed=(('model.qk_norm', 'full'), ('model.norm_placement', 'post')),
        absent=dict(rope_theta=5e5, router_aux_loss_coef=0.01)),
    Family('granitemoe', 'GraniteMoeForCausalLM', GQA + (
        Key('num_local_experts', 'model.moe.num_experts'),
        Key('intermediate_size', 'model.moe.expert_ffn_dim'),
        Key('embedding_multiplier', 'model.embedding_multiplier', 1.0, float),
        Key('residual_multiplier', 'model.residual_multiplier', 1.0, float),
        Key('attention_multiplier', 'model.attention_scale', 1.0, float,
            lambda v, m: v or m.head_dim ** -0.5),
        Key('logits_scaling', 'model.logit_divisor', 1.0, float),
        NO_ATTENTION_BIAS, Schedule('every')),
        fixed=(('model.moe.router.norm_topk_prob', True),),
        moe_module='block_sparse_moe', router='router.layer', experts='stacked_linear',
        expert_names=('input_linear.weight', 'input_linear.weight', 'output_linear.weight'),
        absent=dict(max_position_embeddings=2048, router_aux_loss_coef=0.001)),
    Family('dots1', 'Dots1ForCausalLM', _without(GQA, 'router_aux_loss_coef') + FINE_GRAINED + (
        NORM_TOPK, NO_ATTENTION_BIAS, TopkMethod('sigmoid', 'noaux_tc'),
        SlidingLayers(layer_types=True), Schedule('first_k_dense')),
        fixed=(('model.qk_norm', 'head'),), shared_module='shared_experts',
        absent=dict(max_position_embeddings=2048, num_key_value_heads=32)),
    Family('glm4_moe', 'Glm4MoeForCausalLM',
           _without(GQA, 'router_aux_loss_coef') + FINE_GRAINED + (
        Key('attention_bias', 'model.qkv_bias', False, bool),
        Key('use_qk_norm', 'model.qk_norm', False, lambda v: 'head' if v else 'none',
            lambda v, m: v == 'head'),
        NORM_TOPK, TopkMethod('sigmoid', 'noaux_tc'), Schedule('first_k_dense')),
        shared_module='shared_experts',
        absent=dict(first_k_dense_replace=1, max_position_embeddings=131072, n_shared_experts=1,
                    norm_topk_prob=True, num_key_value_heads=8, rms_norm_eps=1e-5,
                    partial_rotary_factor=0.5)),
    # Solar Open: GLM-4.5's routing in every layer, without q/k norms, the whole head rotated.
    Family('solar_open', 'SolarOpenForCausalLM',
           _without(GQA, 'router_aux_loss_coef') + _without(FINE_GRAINED, 'intermediate_size') + (
        Key('attention_bias', 'model.qkv_bias', False, bool),
        NORM_TOPK, TopkMethod('sigmoid', 'noaux_tc'), Schedule('every')),
        shared_module='shared_experts',
        absent=dict(head_dim=128, max_position_embeddings=131072, n_shared_experts=1,
                    norm_topk_prob=True, num_key_value_heads=8, rms_norm_eps=1e-5,
                    rope_theta=1e6)),
    Family('minimax_m2', 'MiniMaxM2ForCausalLM', GQA + (
        Key('num_local_experts', 'model.moe.num_experts'),
        Key('intermediate_size', 'model.moe.expert_ffn_dim'),
        Key('router_jitter_noise', 'model.moe.router.jitter', 0.0, float),
        NO_ATTENTION_BIAS, Schedule('every')),
        fixed=(('model.qk_norm', 'full'),) + SIGMOID_BIASED,
        moe_module='block_sparse_moe', selection_bias='e_score_correction_bias',
        expert_names=tuple(f'experts.{{e}}.{w}.weight' for w in ('w1', 'w3', 'w2')),
        absent=dict(head_dim=128, max_position_embeddings=196608, num_key_value_heads=8,
                    rope_theta=5e6, router_aux_loss_coef=0.001)),
    Family('ernie4_5_moe', 'Ernie4_5_MoeForCausalLM', _without(GQA, 'num_experts_per_tok') + (
        Key('moe_k', 'model.moe.num_experts_per_tok', aliases=('num_experts_per_tok',)),
        Key('moe_num_experts', 'model.moe.num_experts', aliases=('num_experts',)),
        Key('intermediate_size', 'model.ffn_dim'),
        Key('moe_intermediate_size', 'model.moe.expert_ffn_dim'),
        Key('moe_num_shared_experts', 'model.moe.num_shared_experts', 0),
        Const('use_bias', False, 'biased linear layers', absent=False),
        Schedule('start_end_interval')),
        fixed=(('model.moe.router.norm_topk_prob', True),
               ('model.moe.balance.selection_bias', True)),
        shared_module='shared_experts', rope_pairs='interleaved',
        selection_bias='moe_statics.e_score_correction_bias', selection_bias_2d=True,
        absent=dict(max_position_embeddings=131072, moe_layer_start_index=1,
                    moe_num_shared_experts=2, num_key_value_heads=4, rms_norm_eps=1e-5,
                    rope_theta=5e5,
                    router_aux_loss_coef=0.001)),
    # Flint: Qwen3-MoE's attention with attention sinks, windows by layer_types and rotary
    # embedding on the windowed layers only; sigmoid top-K renormalised; an ungated shared expert.
    Family('flint', 'FlintForCausalLM', GQA + SPARSE_STEP + (
        NORM_TOPK, NO_ATTENTION_BIAS, SlidingLayers(layer_types=True),
        SharedExpert(gated=False)),
        fixed=(('model.qk_norm', 'head'), ('model.attention_sinks', True),
               ('model.rope_layers', 'windowed'), ('model.moe.router.score_fn', 'sigmoid')),
        tensor_names=(('self_attn.sinks', 'self_attn.softmax_offset'),),
        absent=dict(head_dim=128, max_position_embeddings=262144, mlp_only_layers=[0, 1],
                    norm_topk_prob=True, num_key_value_heads=4, router_aux_loss_coef=0.0005,
                    shared_expert_intermediate_size=1024, sliding_window=513)),
    # EXAONE-MoE: per-head q/k norms, rotary embedding on the windowed layers only, DeepSeek-V3's
    # routing with shared experts under keys of its own; MoE layers by each layer's kind.
    Family('exaone_moe', 'ExaoneMoeForCausalLM', _without(GQA, 'router_aux_loss_coef') + (
        *_shared_and_routed('routed_scaling_factor'),
        NORM_TOPK, NO_ATTENTION_BIAS, TopkMethod('sigmoid', 'noaux_tc'),
        SlidingLayers(layer_types=True), Schedule('mlp_layer_types')),
        fixed=(('model.qk_norm', 'head'), ('model.rope_layers', 'windowed')),
        shared_module='shared_experts', selection_bias='e_score_correction_bias',
        absent=dict(first_k_dense_replace=1, max_position_embeddings=2048, norm_topk_prob=True,
                    num_key_value_heads=32, num_shared_experts=1, rms_norm_eps=1e-5,
                    routed_scaling_factor=2.5, sliding_window=4096)),
    # Hunyuan 3: per-head q/k norms, sigmoid scores with a selection bias, renormalised and
    # scaled, shared experts; MoE layers by each layer's kind.
    Family('hy_v3', 'HYV3ForCausalLM', _without(GQA, 'router_aux_loss_coef') + (
        *_shared_and_routed('router_scaling_factor'),
        Const('mlp_bias', False, 'biased FFN projections', absent=False),
        AttentionBias(), Schedule('mlp_layer_types')),
        fixed=(('model.qk_norm', 'head'),) + SIGMOID_BIASED,
        router='router.gate', selection_bias='expert_bias', shared_module='shared_mlp',
        absent=dict(first_k_dense_replace=1, head_dim=128, max_position_embeddings=131072,
                    num_key_value_heads=8, num_shared_experts=1, rms_norm_eps=1e-5,
                    rope_theta=11158840.0, router_scaling_factor=2.826)),
    # AFMoE (Arcee Trinity): windows on 3 layers of 4 and rotary embedding there only, per-head
    # q/k norms, a sigmoid output gate per head, norms before and after each sublayer, sigmoid
    # scores with a selection bias, renormalised and scaled, shared experts, muP input scaling.
    Family('afmoe', 'AfmoeForCausalLM', _without(GQA, 'router_aux_loss_coef') + (
        *_shared_and_routed('route_scale'),
        AttentionBias(), SlidingLayers(layer_types=True), MupInput(),
        Schedule('num_dense_layers')),
        fixed=(('model.qk_norm', 'head'), ('model.rope_layers', 'windowed'),
               ('model.attention_output_gate', True),
               ('model.norm_placement', 'both')) + SIGMOID_BIASED,
        router='router.gate', selection_bias='expert_bias', shared_module='shared_experts',
        tensor_names=(('pre_feedforward_layernorm', 'pre_mlp_layernorm'),
                      ('post_feedforward_layernorm', 'post_mlp_layernorm')),
        absent=dict(head_dim=128, max_position_embeddings=16384, num_dense_layers=1,
                    num_shared_experts=2, rms_norm_eps=1e-5, sliding_window=1024)),
    # Aria's language model: softmax top-K renormalised (a softmax over the chosen logits),
    # shared experts, the routed experts as grouped matrices (fc1 [N, D, 2F], fc2 [N, F, D]).
    Family('aria_text', 'AriaTextForCausalLM',
           _without(GQA, 'num_experts_per_tok', 'router_aux_loss_coef') + (
        Key('moe_topk', 'model.moe.num_experts_per_tok'),
        Key('moe_num_experts', 'model.moe.num_experts'),
        Key('intermediate_size', 'model.moe.expert_ffn_dim'),
        Key('moe_num_shared_experts', 'model.moe.num_shared_experts', 0),
        Const('mlp_bias', False, 'biased FFN projections', absent=False),
        AttentionBias(), Schedule('every')),
        fixed=(('model.moe.router.norm_topk_prob', True),),
        router='router', experts='stacked', shared_module='shared_experts',
        expert_names=('experts.fc1.weight', 'experts.fc1.weight', 'experts.fc2.weight'),
        absent=dict(max_position_embeddings=2048, moe_num_shared_experts=2)),
    # MiniCPM 5 MoE: a sigmoid output gate per head stored inside the query projection (per
    # head: query rows, then gate rows), DeepSeek-V3's routing, MoE layers by each layer's kind.
    Family('minicpm5_moe', 'MiniCPM5MoeForCausalLM',
           _without(GQA, 'router_aux_loss_coef') + FINE_GRAINED + (
        NORM_TOPK, AttentionBias(), TopkMethod('sigmoid', 'noaux_tc'),
        Schedule('mlp_layer_types')),
        fixed=(('model.attention_output_gate', True),),
        shared_module='shared_experts', query_gate=True,
        absent=dict(first_k_dense_replace=1, head_dim=128, max_position_embeddings=524288,
                    n_shared_experts=1, norm_topk_prob=True, num_key_value_heads=2,
                    rope_theta=5e6, routed_scaling_factor=3.66)),
    # Kolibri 1: EXAONE 4's attention (rotary on the windowed layers only), norms before and
    # after each sublayer, sigmoid scores chosen on the logits plus a selection bias, an ungated
    # shared expert in every layer; the checkpoints' own norm and bias names.
    Family('kolibri1', 'Kolibri1ForCausalLM', GQA + (
        Key('num_local_experts', 'model.moe.num_experts', aliases=('num_experts',)),
        Key('moe_intermediate_size', 'model.moe.expert_ffn_dim'),
        NORM_TOPK, SlidingLayers(layer_types=True), SharedExpert(gated=False),
        Schedule('every')),
        fixed=(('model.qk_norm', 'head'), ('model.rope_layers', 'windowed'),
               ('model.norm_placement', 'both'), ('model.moe.router.score_fn', 'sigmoid'),
               ('model.moe.router.select_on', 'logits'),
               ('model.moe.balance.selection_bias', True)),
        shared_module='shared_experts',
        tensor_names=(('post_attention_layernorm', 'post_attn_norm'),
                      ('pre_feedforward_layernorm', 'post_attention_layernorm'),
                      ('post_feedforward_layernorm', 'post_ffn_norm'),
                      ('mlp.gate.e_score_correction_bias', 'moe.router.expert_bias')),
        absent=dict(head_dim=128, max_position_embeddings=262144, num_key_value_heads=4,
                    shared_expert_intermediate_size=512, sliding_window=513)),
    # Hunyuan-A13B: per-head q/k norms after the rotation, softmax top-K renormalised, a shared
    # expert as wide as the routed ones in every layer.
    Family('hunyuan_v1_moe', 'HunYuanMoEV1ForCausalLM', _without(GQA, 'num_experts_per_tok') + (
        Key('moe_topk', 'model.moe.num_experts_per_tok', to_moejax=_one_per_model('moe_topk')),
        Key('num_experts', 'model.moe.num_experts', to_moejax=_one_per_model('num_experts')),
        Key('intermediate_size', 'model.moe.expert_ffn_dim'),
        NO_ATTENTION_BIAS, Schedule('every')),
        fixed=(('model.qk_norm', 'head'), ('model.qk_norm_after_rope', True),
               ('model.moe.router.norm_topk_prob', True), ('model.moe.num_shared_experts', 1)),
        router='gate.wg', shared_module='shared_mlp',
        qk_norm_names=('query_layernorm', 'key_layernorm'),
        absent=dict(max_position_embeddings=2048, rms_norm_eps=1e-5)),
    # Qwen3-Next: Gated DeltaNet layers (layer_types; q, k, v, z and b, a fused per key head)
    # beside attention layers with the output gate inside q_proj (per head: query, gate), norms
    # stored zero-centred, a sigmoid-gated shared expert.
    Family('qwen3_next', 'Qwen3NextForCausalLM', GQA + SPARSE_STEP + (
        NORM_TOPK, NO_ATTENTION_BIAS, SharedExpert(), LinearLayers()),
        fixed=(('model.qk_norm', 'head'), ('model.attention_output_gate', True)),
        query_gate=True, zero_centred_norms=True, linear_layout='per_key_head',
        absent=dict(LINEAR_DEFAULTS, head_dim=256, intermediate_size=5632,
                    max_position_embeddings=32768, moe_intermediate_size=512, norm_topk_prob=True,
                    num_experts=512, num_experts_per_tok=10, num_key_value_heads=2,
                    partial_rotary_factor=0.25, router_aux_loss_coef=0.001,
                    shared_expert_intermediate_size=512)),
    # Qwen3.5-MoE's language model: Qwen3-Next's, MoE in every layer, the top-K always
    # renormalised, the Gated DeltaNet projections apart (in_proj_qkv, in_proj_z, _b, _a).
    Family('qwen3_5_moe_text', 'Qwen3_5MoeForCausalLM', GQA + (
        *ROUTED, NO_ATTENTION_BIAS, SharedExpert(), LinearLayers(), Schedule('every')),
        fixed=(('model.qk_norm', 'head'), ('model.attention_output_gate', True),
               ('model.moe.router.norm_topk_prob', True)),
        query_gate=True, zero_centred_norms=True, linear_layout='split',
        absent=dict(LINEAR_DEFAULTS, head_dim=256, max_position_embeddings=32768,
                    moe_intermediate_size=512, num_experts=256, num_experts_per_tok=8,
                    num_key_value_heads=2, partial_rotary_factor=0.25,
                    router_aux_loss_coef=0.001, shared_expert_intermediate_size=512)),
    # Lara Mini: Qwen3.5's Gated DeltaNet layers (their six projections in one in_proj) between
    # windowed layers that rotate and full-attention layers without positions, softmax top-K
    # renormalised, an ungated shared expert, stacked experts; the checkpoints' own norm name.
    Family('lara_mini', 'LaraMiniForCausalLM', GQA + (
        *ROUTED, NORM_TOPK, NO_ATTENTION_BIAS, SharedExpert(gated=False),
        SlidingLayers(layer_types=True), LinearLayers(windows=True), Schedule('every')),
        fixed=(('model.qk_norm', 'head'), ('model.rope_layers', 'windowed')),
        experts='stacked_linear', expert_names=STACKED, linear_layout='fused',
        tensor_names=(('linear_attn.norm.', 'linear_attn.out_norm.'),),
        absent=dict(LINEAR_DEFAULTS, head_dim=128, linear_num_key_heads=8,
                    linear_num_value_heads=16, max_position_embeddings=131072, norm_topk_prob=True,
                    num_experts=128, num_experts_per_tok=4, num_key_value_heads=4,
                    router_aux_loss_coef=0.001, shared_expert_intermediate_size=512,
                    sliding_window=512)),
    Family('phimoe', 'PhimoeForCausalLM', GQA + (
        Key('num_local_experts', 'model.moe.num_experts'),
        Key('intermediate_size', 'model.moe.expert_ffn_dim'),
        Key('router_jitter_noise', 'model.moe.router.sparsemixer_eps', 0.01, float),
        Key('input_jitter_noise', 'model.moe.router.jitter', 0.0, float),
        Key('lm_head_bias', 'model.head_bias', False, bool),
        AttentionBias(), SlidingLayers(), Schedule('every')),
        fixed=(('model.norm', 'layer'), ('model.moe.router.name', 'sparsemixer')),
        moe_module='block_sparse_moe',
        expert_names=tuple(f'experts.{{e}}.{w}.weight' for w in ('w1', 'w3', 'w2')),
        absent=dict(max_position_embeddings=131072, num_key_value_heads=8, rms_norm_eps=1e-5,
                    rope_theta=1e6, router_aux_loss_coef=0.001)),
)}



def _runs_as(of: str, model_type: str, renamed: dict | None = None, layout: dict | None = None,
             **absent) -> Family:
  """A family whose checkpoints transformers runs with the modeling code of family `of` (its
  config class differs in defaults and key names only): `of`'s entry under its own model_type,
  with its own defaults for absent keys, its config.json's own key names (`renamed`) and its
  tensors' (`layout`: Family fields)."""
  base = FAMILIES[of]
  return dataclasses.replace(base, model_type=model_type, renamed=renamed or {},
                             absent={**base.absent, **absent}, **(layout or {}))


# The names the Sarvam and Param-2 checkpoints' own config.json use.
_SARVAM_NAMES = {'num_experts': 'n_routed_experts', 'num_local_experts': 'n_routed_experts',
                 'num_shared_experts': 'n_shared_experts', 'use_qkv_bias': 'attention_bias',
                 'num_mtp_layers': 'num_nextn_predict_layers'}
# ... and their tensors' (q, k, v fused; transformers renames them at load).
_SARVAM_TENSORS = dict(
    fused_qkv='query_key_value', qk_norm_names=('query_layernorm', 'key_layernorm'),
    selection_bias='gate.expert_bias',
    tensor_names=(('model.embed_tokens.', 'model.word_embeddings.'),
                  ('self_attn.o_proj.', 'self_attn.dense.'), ('self_attn.', 'attention.')))
FAMILIES.update({f.model_type: f for f in (
    # Granite MoE with a shared expert beside the MoE block (gate and up in one Linear).
    dataclasses.replace(
        FAMILIES['granitemoe'], model_type='granitemoeshared',
        architecture='GraniteMoeSharedForCausalLM',
        config=FAMILIES['granitemoe'].config + (
            SharedExpert(gated=False, key='shared_intermediate_size'),),
        shared_module='shared_mlp', shared_beside=True, shared_fused=True),
    # The language models of Qwen3-VL-MoE and GLM-4.5V, read from their multimodal checkpoints
    # (convert.LANGUAGE_MODEL) for text: positions the same in the three rotary sections, so
    # one rotary embedding. Qwen3-MoE's and GLM-4.5's models; Qwen3-VL's experts stacked as
    # its checkpoints hold them ([N, D, 2F], [N, F, D]), its top-K always renormalised.
    dataclasses.replace(
        FAMILIES['qwen3_moe'], model_type='qwen3_vl_moe_text', exports_as='qwen3_moe',
        config=_without(FAMILIES['qwen3_moe'].config, 'norm_topk_prob'),
        fixed=FAMILIES['qwen3_moe'].fixed + (('model.moe.router.norm_topk_prob', True),),
        experts='stacked', expert_names=STACKED,
        absent=dict(max_position_embeddings=128000, num_key_value_heads=16, rms_norm_eps=1e-6,
                    rope_theta=5e5, router_aux_loss_coef=0.001)),
    _runs_as('glm4_moe', 'glm4v_moe_text', None, dict(exports_as='glm4_moe'),
             attention_bias=True, max_position_embeddings=65536, rms_norm_eps=1e-5),
    _runs_as('glm4_moe', 'sarvam_moe', _SARVAM_NAMES, _SARVAM_TENSORS, head_dim=64, max_position_embeddings=131072,
             num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=8e6, partial_rotary_factor=1.0,
             routed_scaling_factor=2.5, use_qk_norm=True),
    _runs_as('glm4_moe', 'param2moe', _SARVAM_NAMES, _SARVAM_TENSORS, head_dim=64, max_position_embeddings=32768,
             n_shared_experts=2, rms_norm_eps=1e-6, rope_theta=5e5, partial_rotary_factor=1.0,
             routed_scaling_factor=2.5, use_qk_norm=True),
    _runs_as('deepseek_v3', 'sarvam_mla', {k: v for k, v in _SARVAM_NAMES.items()
                                           if k != 'use_qkv_bias'},
             first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=None),
)})

# Fields every import sets before the family's own (what a family leaves unsaid is off).
IMPORT_BASE = {'model.moe.num_shared_experts': 0, 'model.moe.dispatch.name': 'dropless',
               'model.moe.balance.aux_loss_weight': 0.0,
               'model.moe.balance.z_loss_weight': 0.0}


def family(hf: dict, where: str) -> Family:
  """The entry of a config.json's model_type, or one line saying why there is none."""
  kind = hf.get('model_type', '')
  why = refused.reason(kind)
  if why:
    raise ConfigError(f'{where}: model_type {kind!r} is not supported: {why}')
  if kind not in FAMILIES:
    raise ConfigError(f'{where}: model_type {kind!r} is not supported; supported: '
                      f'{", ".join(sorted(FAMILIES))}')
  return FAMILIES[kind]


def model_fields(hf: dict, where: str) -> dict:
  """The moejax config fields (dotted, from 'model.') of a Hugging Face config.json."""
  fam = family(hf, where)
  hf = {**{fam.renamed[k]: v for k, v in hf.items() if k in fam.renamed}, **hf}
  if hf.get('sliding_window') and not any(isinstance(p, SlidingLayers) for p in fam.config):
    raise ConfigError(f'{where}: sliding_window={hf["sliding_window"]} is not supported for '
                      f'{fam.model_type} (its entry maps no sliding window)')
  hf = {**{k: v for k, v in fam.absent.items() if k not in hf}, **hf}
  out = dict(IMPORT_BASE)
  for piece in fam.config:
    try:
      out.update(piece.read(hf, where))
    except KeyError as e:  # a rule's required key
      raise ConfigError(f'{where}: has no {e.args[0]!r}, which this family needs') from None
  out.update(dict(fam.fixed))
  return out


def hf_config(c, base: dict | None, model_type: str) -> dict:
  """A config.json of moejax config c as `model_type` (over `base`, the imported config.json,
  when there is one), refused in one line when the family cannot express the model."""
  fam = FAMILIES[model_type]
  m = c.model
  hf = dict(base or {})
  hf['model_type'] = model_type
  for piece in fam.config:
    piece.write(m, hf)
  hf['tie_word_embeddings'] = False
  if fam.mtp_key:
    hf[fam.mtp_key] = m.mtp.depth
  elif m.mtp.depth:
    raise ConfigError(f'--model_type={model_type}: this model has multi-token prediction '
                      f'(model.mtp.depth={m.mtp.depth}), which {model_type} does not')
  if fam.rope_pairs not in ('halves', 'interleaved'):
    hf[fam.rope_pairs] = False  # written in moejax's halves
  hf.setdefault('architectures', [fam.architecture])
  for key in ('pad_token_id', 'bos_token_id', 'eos_token_id'):  # not transformers' defaults
    hf.setdefault(key, None)
  _same_model(c, hf, fam)
  return hf


def _leaves(node, prefix):
  for k, v in node.items():
    if hasattr(v, 'items'):
      yield from _leaves(v, f'{prefix}{k}.')
    else:
      yield f'{prefix}{k}', v


# Fields that do not change what the exported model computes (training, kernels, precision).
_NOT_THE_MODEL = ('model.dtype', 'model.remat', 'model.remat_save', 'model.mtp.',
                  'model.moe.dispatch.', 'model.moe.balance.', 'model.moe.router.dtype',
                  'model.moe.router.jitter', 'model.moe.router.freeze',
                  'model.moe.experts.backend', 'model.moe.experts.block_size',
                  'model.linear.chunk', 'model.mla.index_loss_weight')


def _unused(m, field: str) -> bool:
  """Fields the model does not read as configured (so any value exports the same model)."""
  from moejax.model.schedule import layer_plan
  return ((field.startswith('model.mla.') and m.attention != 'mla') or
          (field.startswith('model.rope_scaling.') and field != 'model.rope_scaling.kind' and
           m.rope_scaling.kind == 'none') or
          (field in ('model.sliding_pattern', 'model.rope_layers') and not m.sliding_window) or
          (field == 'model.nope_temperature_floor' and not m.nope_temperature) or
          (field == 'model.linear_pattern' and not any(m.linear_pattern)) or
          (field.startswith('model.linear.') and not any(m.linear_pattern)) or
          (field.startswith('model.mla.index_') and field != 'model.mla.index_topk' and
           not m.mla.index_topk) or
          (field == 'model.moe.shared_expert_ffn_dim' and not m.moe.num_shared_experts) or
          (field == 'model.ffn_dim' and layer_plan(m)[0] == 0 and m.moe_layer_freq == 1))


def _same_model(c, hf: dict, fam: Family) -> None:
  """Read the written config.json back through the entry: every field that shapes the model
  must come back as it is, else the family cannot express this model."""
  from moejax.config import base_config, get_field
  from moejax.moe.routers.base import resolve_group_score
  back = model_fields(hf, f'--model_type={fam.model_type}')
  defaults = base_config()
  unchecked = {f for piece in fam.config for f in getattr(piece, 'UNCHECKED', ())}
  wrong = []
  for field, value in _leaves(c.model, 'model.'):
    if field.startswith(_NOT_THE_MODEL) or field in unchecked or _unused(c.model, field):
      continue
    got = back[field] if field in back else get_field(defaults, field)
    if field == 'model.moe.router.group_score':
      value = resolve_group_score(value, c.model.moe.router.score_fn)
      got = resolve_group_score(got, back.get('model.moe.router.score_fn', 'softmax'))
    if field == 'model.attention_scale':  # 0: head_dim ** -0.5
      value = value or c.model.head_dim ** -0.5
      got = got or back.get('model.head_dim', c.model.head_dim) ** -0.5
    if field == 'model.moe.shared_expert_ffn_dim':  # 0: num_shared * the expert width
      moe = c.model.moe
      value = value or moe.num_shared_experts * moe.expert_ffn_dim
      got = got or back.get('model.moe.num_shared_experts', 0) * back.get(
          'model.moe.expert_ffn_dim', 0)
    if isinstance(value, (tuple, list)):
      value, got = tuple(value), tuple(got)
    if value != got:
      wrong.append(f'{field.removeprefix("model.")}={value!r}')
  m = c.model
  if ((m.moe.balance.selection_bias or m.moe.balance.bias_update_rate > 0) and
      not back.get('model.moe.balance.selection_bias')):
    wrong.append('balance.selection_bias=True')
  if wrong:
    raise ConfigError(f'--model_type={fam.model_type}: this model ({", ".join(wrong)}) is not '
                      f'a {fam.model_type} model')
