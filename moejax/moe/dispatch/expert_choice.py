"""Expert choice's own dispatch: each expert processes the C tokens it chose."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moejax.moe.dispatch.base import Dispatcher, register
from moejax.moe.types import RouterOutput


@register('expert_choice')
@dataclasses.dataclass(frozen=True)
class ExpertChoiceDispatch(Dispatcher):
  """Expert choice: expert i processes its C chosen tokens (routing.expert_choice); outputs are
  added back weighted. Never dropless or dropping in the token-choice sense: a token may get
  zero experts (counted as zero_expert_fraction; the residual alone carries it). The
  expert-choice router picks this dispatcher itself (Router.OWN_DISPATCH)."""

  @classmethod
  def check(cls, config, fail):
    fail('model.moe.dispatch.name', 'expert_choice', "is chosen by router.name="
         "'expert_choice' itself; dispatch.name is the dispatcher of its evaluation top-K "
         "(e.g. 'dropless')")

  def __call__(self, x, r: RouterOutput, experts, train: bool):
    del train
    t, d = x.shape
    ec = r.expert_choice
    n, c = ec.token_index.shape
    buffers = x[ec.token_index]  # [N, C, D]
    y_buf = experts.capacity(buffers) * ec.weights[..., None].astype(x.dtype)  # [N, C, D]
    with jax.named_scope('combine'):
      y = jnp.zeros((t, d), y_buf.dtype).at[ec.token_index.reshape(-1)].add(
          y_buf.reshape(n * c, d))
    hits = jnp.zeros((t,), jnp.float32).at[ec.token_index.reshape(-1)].add(1.0)
    return y, {'dropped_fraction': jnp.zeros((), jnp.float32),
               'zero_expert_fraction': jnp.mean((hits == 0).astype(jnp.float32))}
