"""Rematerialisation of each block in the backward pass (model.remat): 'none' keeps every
activation, 'full' keeps only each block's input and recomputes the rest, 'names' keeps the
activations named in model.remat_save and recomputes the rest."""
from __future__ import annotations

import jax
from flax import linen as nn

REMAT = ('none', 'full', 'names')
# Activations tagged with jax.ad_checkpoint.checkpoint_name, which remat='names' can keep:
# a block's normed attention input, its query/key/value projections (GQA; MLA: the query and
# the key-value latent), the attention output, the normed FFN input, the dense SwiGLU hidden
# activation, and the FFN (dense or MoE) output.
REMAT_NAMES = ('attn_in', 'query_proj', 'key_proj', 'value_proj', 'kv_latent', 'attn_out',
               'ffn_in', 'ffn_hidden', 'ffn_out')


def remat_policy(cfg):
  """The jax.checkpoint policy of model.remat ('full': None, save nothing but the inputs)."""
  if cfg.remat == 'names':
    return jax.checkpoint_policies.save_only_these_names(*cfg.remat_save)
  return None


def rematted(cls, cfg):
  """cls wrapped in nn.remat as model.remat asks (unchanged for 'none')."""
  if cfg.remat == 'none':
    return cls
  return nn.remat(cls, prevent_cse=False, policy=remat_policy(cfg))
