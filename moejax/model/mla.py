"""Multi-head Latent Attention (DeepSeek-V2/V3, arXiv:2405.04434).

Queries: x -> (low-rank q_lora_rank, RMSNorm) -> per head [qk_nope_head_dim | qk_rope_head_dim].
Keys/values: x -> a joint latent c_kv of kv_lora_rank (RMSNorm) plus one decoupled rotary key
k_rope of qk_rope_head_dim shared by all heads; c_kv -> per head [k_nope | v]. Only c_kv and
k_rope need caching: kv_lora_rank + qk_rope_head_dim numbers per token per layer (576 for V3).
q_lora_rank = 0 projects queries directly (DeepSeek-V2-Lite). With mla.index_topk > 0 each query
attends only to the keys a lightning indexer selects (DeepSeek Sparse Attention, indexer.py).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from moejax.model.attention import update_cache
from moejax.model.indexer import LightningIndexer, indexer_loss, select_keys
from moejax.model.rope import apply_rope
from moejax.nn.layers import RMSNorm, constrain, param_with_axes


class MultiHeadLatentAttention(nn.Module):
  """Multi-head latent attention (DeepSeek-V2/V3): keys and values come from a shared latent of
  kv_lora_rank numbers per token plus one rotary key of qk_rope_head_dim; decoding caches only
  those (kv_lora_rank + qk_rope_head_dim numbers per token and layer)."""
  num_heads: int
  mla: Any  # model.mla: q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim,
  # and the indexer's index_topk, index_heads, index_head_dim, index_loss_weight, index_warmup
  rope_theta: float
  norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  cache_len: int = 0  # > 0: decoding, caching only the latent and the rotary key

  @nn.compact
  def __call__(self, x, positions):
    """Args:
      x: [b, s, d] the normed block input.
      positions: [b, s] int32 absolute positions.
    Returns:
      [b, s, d] in `dtype`.
    """
    b, s, d = x.shape
    h, m = self.num_heads, self.mla
    nope, rope, vd = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    x = x.astype(self.dtype)

    def w(name, shape, axes):
      return param_with_axes(self, name, shape, axes).astype(self.dtype)

    if m.q_lora_rank:
      q_lat = x @ w('wq_a', (d, m.q_lora_rank), ('embed', 'q_lora'))
      q_lat = RMSNorm(self.norm_eps, self.dtype, name='q_norm')(q_lat)
      q = jnp.einsum('bsr,rhk->bshk', q_lat, w('wq_b', (m.q_lora_rank, h, nope + rope),
                                                 ('q_lora', 'heads', 'head_dim')))
    else:
      q = jnp.einsum('bsd,dhk->bshk', x, w('wq', (d, h, nope + rope), ('embed', 'heads', 'head_dim')))
    q = checkpoint_name(q, 'query_proj')
    q_nope, q_rope = q[..., :nope], apply_rope(q[..., nope:], positions, self.rope_theta)

    kv = checkpoint_name(x @ w('wkv_a', (d, m.kv_lora_rank + rope), ('embed', 'kv_lora')),
                         'kv_latent')  # [b, s, r + rope]
    c_kv = RMSNorm(self.norm_eps, self.dtype, name='kv_norm')(kv[..., :m.kv_lora_rank])
    k_rope = apply_rope(kv[..., None, m.kv_lora_rank:], positions, self.rope_theta)  # [b,s,1,rope]
    key_pos = positions  # [b, s]
    if self.cache_len:
      cache, key_pos = update_cache(self, {'c_kv': c_kv, 'k_rope': k_rope}, self.cache_len)
      c_kv, k_rope, key_pos = cache['c_kv'], cache['k_rope'], key_pos[None]
    kv_up = jnp.einsum('bsr,rhk->bshk', c_kv, w('wkv_b', (m.kv_lora_rank, h, nope + vd),
                                                 ('kv_lora', 'heads', 'head_dim')))
    k_nope, v = kv_up[..., :nope], kv_up[..., nope:]  # [b, s, h, nope], [b, s, h, vd]

    logits = (jnp.einsum('bqhk,bshk->bhqs', q_nope, k_nope) +
              jnp.einsum('bqhk,bsk->bhqs', q_rope, k_rope[:, :, 0])).astype(jnp.float32)
    logits = logits * (nope + rope) ** -0.5
    causal = positions[:, None, :, None] >= key_pos[:, None, None, :]  # [b, 1, q, s]
    attend = causal
    if m.index_topk:  # DeepSeek Sparse Attention: the keys the indexer selects
      scores, _ = LightningIndexer(m.index_heads, m.index_head_dim, rope, self.rope_theta,
                                   self.dtype, self.cache_len, name='indexer')(
                                       x, q_lat, positions)
      if not m.index_warmup:  # (the dense warm-up attends to every earlier key)
        attend = select_keys(scores, causal[:, 0], m.index_topk)[:, None]
    logits = jnp.where(attend, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if (m.index_topk and m.index_loss_weight and not self.is_initializing() and
        self.is_mutable_collection('losses')):  # training: the indexer's own loss
      self.put_variable('losses', 'indexer', m.index_loss_weight * indexer_loss(
          scores, probs, attend[:, 0]))
    out = jnp.einsum('bhqs,bshk->bqhk', probs.astype(self.dtype), v)
    out = jnp.einsum('bshk,hkd->bsd', out, w('wo', (h, vd, d), ('heads', 'head_dim', 'embed')))
    return constrain(out, ('batch', 'length', 'act_embed'))
