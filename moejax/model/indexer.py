"""The lightning indexer of DeepSeek Sparse Attention (DeepSeek-V3.2, arXiv:2512.02556).

For a query token t and an earlier token s the indexer scores
    I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s] / sqrt(d_I)),
with H_I light query heads q[t, j] of d_I (from the attention's query latent), one key k[s] of
d_I per token (a LayerNorm of a projection of the block input) and per-head weights
w[t, j] = (x_t W_w)_j / sqrt(H_I); both q and k rotate their first qk_rope_head_dim dims. Each
query then attends only to the top_k earlier tokens by I (all of them while there are fewer).

Training (the paper's continued pre-training): the indexer learns only from its own loss, the KL
divergence from the main attention's distribution over the keys (summed over heads, L1-normed;
no gradient into the attention) to softmax(I) over the same keys: every earlier key in the dense
warm-up, the selected ones in sparse training. Its inputs are detached, so the language-model
loss never reaches it and its loss never reaches the model. Selection is a mask over the
attention scores here (the computation stays dense; no gather kernel yet).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.model.attention import update_cache
from moejax.model.rope import apply_rope
from moejax.nn.layers import LayerNorm, param_with_axes


class LightningIndexer(nn.Module):
  """Index scores of every (query, key) pair: [b, s] tokens -> [b, s, t] float32."""
  num_heads: int  # H_I
  head_dim: int  # d_I
  rope_dim: int  # the first rope_dim dims of q and k rotate
  rope_theta: float
  dtype: Any = jnp.float32
  cache_len: int = 0  # > 0: decoding, its keys cached (collection 'cache', 'index_k')

  @nn.compact
  def __call__(self, x, q_lat, positions):
    """Args:
      x: [b, s, d] the normed block input.
      q_lat: [b, s, r] the attention's normed query latent.
      positions: [b, s] int32 absolute positions.
    Returns:
      (scores [b, s, t] float32, key positions [b or 1, t]): t = s, or the cache's length.
    """
    b, s, d = x.shape
    h, dk = self.num_heads, self.head_dim
    x, q_lat = jax.lax.stop_gradient(x), jax.lax.stop_gradient(q_lat)  # trained by its loss only

    def w(name, shape, axes):
      return param_with_axes(self, name, shape, axes).astype(self.dtype)

    q = jnp.einsum('bsr,rhk->bshk', q_lat.astype(self.dtype),
                   w('wq', (q_lat.shape[-1], h, dk), ('q_lora', 'heads', 'head_dim')))
    k = LayerNorm(1e-6, self.dtype, name='k_norm')(
        x.astype(self.dtype) @ w('wk', (d, dk), ('embed', 'head_dim')))  # [b, s, dk]
    q = apply_rope(q, positions, self.rope_theta, rotary_dim=self.rope_dim)
    k = apply_rope(k[:, :, None], positions, self.rope_theta, rotary_dim=self.rope_dim)[:, :, 0]
    weights = (x.astype(self.dtype) @ w('w_heads', (d, h), ('embed', 'heads'))).astype(
        jnp.float32) * h ** -0.5  # [b, s, h]
    key_pos = positions
    if self.cache_len:
      cache, key_pos = update_cache(self, {'index_k': k}, self.cache_len)
      k, key_pos = cache['index_k'], key_pos[None]
    dots = jnp.einsum('bshk,btk->bsht', q.astype(jnp.float32), k.astype(jnp.float32))
    scores = jnp.einsum('bsh,bsht->bst', weights, jax.nn.relu(dots * dk ** -0.5))
    return scores, key_pos


def select_keys(scores, causal, top_k: int):
  """The top_k keys of each query by index score among the earlier ones (all of them while
  there are fewer).

  Args:
    scores: [b, s, t] index scores.
    causal: [b or 1, s, t] bool, the keys each query may see.
    top_k: how many keys a query attends to.
  Returns:
    [b, s, t] bool: selected and visible.
  """
  b, s, t = scores.shape
  k = min(top_k, t)
  masked = jnp.where(causal, scores, -jnp.inf)
  _, idx = jax.lax.top_k(masked, k)  # [b, s, k]
  chosen = jnp.zeros((b, s, t), bool).at[
      jnp.arange(b)[:, None, None], jnp.arange(s)[None, :, None], idx].set(True)
  return jax.lax.stop_gradient(chosen & causal)


def indexer_loss(scores, probs, keys):
  """The indexer's KL loss, averaged over query tokens.

  Args:
    scores: [b, s, t] index scores (the indexer's parameters get this loss's gradient).
    probs: [b, h, s, t] the main attention's probabilities (no gradient flows into them).
    keys: [b or 1, s, t] bool, the keys the loss compares over (earlier keys, or the selected).
  Returns:
    scalar float32: mean over the b * s queries of KL(p_t || softmax(I_t)) over `keys`, with
    p_t the heads' probabilities summed and L1-normalised over `keys`.
  """
  p = jnp.where(keys, jnp.sum(jax.lax.stop_gradient(probs).astype(jnp.float32), axis=1), 0.0)
  p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
  log_q = jax.nn.log_softmax(jnp.where(keys, scores, -jnp.inf), axis=-1)
  kl = jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - jnp.where(keys, log_q, 0.0)),
                 0.0)
  return jnp.mean(jnp.sum(kl, axis=-1))
