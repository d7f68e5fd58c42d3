"""The parameter tree's module names, spelled once. The model builds its modules under these
names, and everything that finds parameters by path (the router freeze mask, parameter counts,
upcycling, the Hugging Face layout) reads them here. (Imports nothing from moejax.)

Decoder (model/transformer.py): the first_k_dense dense layers are DENSE_STACK/DENSE_BLOCK,
the periods of moe_layer_freq layers MOE_STACK/MOE_BLOCK and MOE_STACK/dense_block(j), the
leftover layers TAIL_STACK/...; each stack has a leading layer axis (nn.scan), the tail none.
With linear-attention layers (model.linear_pattern of length P > 1), the dense stack's step is
P blocks, dense_layer_block(j), and a period covers lcm(P, moe_layer_freq) layers with its
k-th MoE block moe_block(k). A block's FFN is MOE (a MoE layer) or FFN (dense). A MoE layer (moe/layer.py) holds ROUTER,
EXPERTS (stacked, expert axis first) and SHARED.
"""
DENSE_STACK, DENSE_BLOCK = 'dense_layers', 'block'
MOE_STACK, MOE_BLOCK = 'moe_layers', 'moe_block'
TAIL_STACK = 'tail_layers'
MOE, FFN = 'moe', 'ffn'
ROUTER, EXPERTS, SHARED = 'router', 'experts', 'shared'


def dense_block(j: int) -> str:
  """The j-th dense block of a MoE period (after its MoE block)."""
  return f'dense_block_{j}'


def moe_block(k: int) -> str:
  """The k-th MoE block of a period (periods with several: linear-attention patterns)."""
  return MOE_BLOCK if k == 0 else f'{MOE_BLOCK}_{k}'


def dense_layer_block(j: int, per_step: int) -> str:
  """The j-th block of a step of the dense stack of per_step blocks."""
  return DENSE_BLOCK if per_step == 1 else f'{DENSE_BLOCK}_{j}'
