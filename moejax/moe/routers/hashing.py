"""Hash routing (Roller et al. 2021, arXiv:2106.04426): a fixed token-id -> experts map.

No router parameters and no balance loss. 'random': each vocabulary id gets K distinct experts
drawn once from a seeded generator. 'balanced': id v goes to experts (v + j * N // K) mod N for
j < K, so every expert serves the same number of vocabulary ids (to within one).
Weights are uniform, 1/K.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from moejax.moe.routers.base import Router, register
from moejax.moe.types import RouterOutput


KINDS = ('random', 'balanced')


def hash_table(vocab_size: int, num_experts: int, k: int, kind: str, seed: int) -> np.ndarray:
  """[vocab, K] int32 expert ids, distinct within a row."""
  if kind == 'balanced':
    stride = max(num_experts // k, 1)
    ids = np.arange(vocab_size)[:, None] + stride * np.arange(k)[None, :]
    return (ids % num_experts).astype(np.int32)
  rng = np.random.default_rng(seed)
  return np.stack([rng.permutation(num_experts)[:k] for _ in range(vocab_size)]).astype(np.int32)


@register('hash')
class HashRouter(Router):
  """hash_kind: 'random' or 'balanced'; hash_seed: the random map's seed. Routes by token id
  over the model's vocabulary (vocab_size). No weights and no scores, so no logits settings,
  score_fn or selection."""
  hash_kind: str = 'random'
  hash_seed: int = 0

  KINDS = KINDS

  @classmethod
  def check(cls, moe, fail):
    if moe.router.hash_kind not in cls.KINDS:
      fail('model.moe.router.hash_kind', moe.router.hash_kind, f'must be one of {list(cls.KINDS)}')

  @nn.compact
  def __call__(self, x, token_ids=None, batch: int = 1, train: bool = True, bias=None,
               state=None, replay=None, layer=None) -> RouterOutput:
    del batch, train, bias, state, replay
    if token_ids is None:
      raise ValueError("router.name='hash' routes by token id; the MoE layer got none")
    table = jnp.asarray(hash_table(self.vocab_size, self.num_experts, self.k, self.hash_kind,
                                   self.hash_seed))
    index = table[token_ids]  # [T, K]
    t = x.shape[0]
    weights = jnp.full((t, self.k), 1.0 / self.k, jnp.float32)
    # "Probabilities" for statistics: the uniform weight on the chosen experts.
    probs = jnp.zeros((t, self.num_experts), jnp.float32).at[
        jnp.arange(t)[:, None], index].set(1.0 / self.k)
    return RouterOutput(expert_index=index, combine_weights=weights, probs=probs,
                        logits=jnp.zeros((t, self.num_experts), jnp.float32))
