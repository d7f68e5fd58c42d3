"""Grouped top-K (Mixture of Grouped Experts, Pangu Pro MoE, arXiv:2505.21411): the N experts
are split into M equal groups (one per device, say) and every token takes its best K / M
experts of each group, so every group serves exactly K / M of each token's choices and
devices holding one group each are balanced by construction.

Not group-limited routing (router.num_groups / topk_groups, DeepSeek-V2/V3), which keeps the
best groups and may take all K experts from one. The scores, weights and selection bias are the
top-K router's (score_fn, norm_topk_prob, routed_scaling_factor); only the selection differs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.moe.routers.base import register
from moejax.moe.routers.topk import TopKRouter


def grouped_top_k(choice, k: int, groups: int):
  """The best k / groups experts of each of `groups` equal groups.

  Args:
    choice: [T, N] selection scores (N divisible by groups).
    k: the experts per token (divisible by groups).
    groups: M.
  Returns:
    [T, K] int32 expert ids: group 0's choices first (best first), then group 1's, ...
  """
  t, n = choice.shape
  per_group = n // groups
  _, local = jax.lax.top_k(choice.reshape(t, groups, per_group), k // groups)  # [T, M, K/M]
  offset = (jnp.arange(groups) * per_group)[None, :, None]
  return (local + offset).reshape(t, k).astype(jnp.int32)


@register('grouped_topk')
class GroupedTopKRouter(TopKRouter):
  """expert_groups = M: K / M experts from each of M equal groups of experts; the rest as the
  'topk' router (score_fn, norm_topk_prob, routed_scaling_factor, the selection bias)."""
  expert_groups: int = 1

  @classmethod
  def check(cls, moe, fail):
    super().check(moe, fail)
    r, n, k = moe.router, moe.num_experts, moe.num_experts_per_tok
    m = r.expert_groups
    if not (isinstance(m, int) and m >= 1):
      fail('model.moe.router.expert_groups', m, 'must be a positive number')
    if n % m or k % m:
      fail('model.moe.router.expert_groups', m, f'must divide model.moe.num_experts={n} and '
           f'num_experts_per_tok={k} (K / M experts from each of M groups)')
    for field, off in (('num_groups', 1), ('null_experts', 0), ('hash_layers', 0)):
      if r[field] != off:
        fail(f'model.moe.router.{field}', r[field], f"is the 'topk' router's; grouped top-K "
             f'takes K / M from every group (set it to {off})')

  def select(self, scores, bias=None):
    """K / M of each group of (scores + selection bias) -> index [T, K]; no gradient."""
    choice = scores if bias is None else scores + bias
    return grouped_top_k(jax.lax.stop_gradient(choice), self.k, self.expert_groups)
