"""What every router shares: the Router contract, the registry table it registers into, float32
logits, and group-limited selection.

A router maps tokens x [T, D] (with their token ids [T] and the number of sequences in the call)
to a `RouterOutput` (moe/types.py). It knows nothing of dispatch (how tokens reach experts);
balance losses are computed from its output (moe/losses.py).

A router's settings are its dataclass fields, read from model.moe.router by the same names (the
constructor is the schema): what it reads is derived from the class, never listed by hand.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.moe import losses
from moejax.moe.balance import SELECTION_BIAS_FIELDS
from moejax.moe.table import Table
from moejax.nn.layers import param_with_axes

# config name -> class, filled by @register in each file of this folder.
ROUTERS = Table('router')
register = ROUTERS.register


class Router(nn.Module):
  """The contract every router declares; the registry derives the config checks from it.

  Fields every router gets: N experts, K slots per token, the vocabulary size (context for
  routers that route by token id). Its own settings: further dataclass fields, each a field
  of model.moe.router of the same name.

  Class attributes (not settings):
    USES_K: reads model.moe.num_experts_per_tok (the slots per token).
    SELECTION_BIAS: selects by score plus the balance strategy's selection bias, so it reads
      the bias fields (moe/balance.py) and takes `bias` in its call.
    REPLAY: its call honours `replay` (route as recorded in an earlier pass).
    LOSSES: the balance losses it offers (names from moe/losses.py); None: every general one
      and its EXTRA_LOSSES.
    state_init / state_update: the layer state it keeps itself (collection 'moe_state':
      checkpointed, no gradient), handed to its call as `state` and updated by the train step
      from the global batch, as the loss-free bias is.
    OWN_DISPATCH: the dispatcher it goes through when uses_dispatch() is False.

  The call, the same for every router (arguments a router has no use for are ignored):
    Args:
      x: [T, D] the tokens (T = batch * sequence length).
      token_ids: [T] int32, or None.
      batch: the sequences in the call (per-sequence scopes).
      train: training routing (jitter, noise, expert choice, Sinkhorn balancing).
      bias: [N] the selection bias (routers with SELECTION_BIAS), or None.
      state: {name: array} the router's own layer state (state_init), or None.
      replay: [T, K] experts to use instead of selecting (routers with REPLAY), or None.
      layer: this layer's index in the model (an int, or traced in a scanned stack), or None.
    Returns:
      RouterOutput (moe/types.py): expert_index and combine_weights [T, K], probs and logits
      [T, N + Z].
  """
  num_experts: int
  k: int
  vocab_size: int = 0

  USES_K = True
  SELECTION_BIAS = False
  REPLAY = False
  LOSSES = None
  EXTRA_LOSSES = ()
  OWN_DISPATCH = None
  _CONTEXT = ('num_experts', 'k', 'vocab_size', 'parent', 'name')

  @classmethod
  def settings(cls) -> tuple:
    """Its own settings: the names of its fields under model.moe.router."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in cls._CONTEXT)

  @classmethod
  def losses(cls) -> tuple:
    """The balance losses it offers (rows of moe/losses.LOSSES)."""
    if cls.LOSSES is not None:
      return tuple(losses.BY_NAME[n] for n in cls.LOSSES)
    return tuple(loss for loss in losses.LOSSES if loss.general or loss.name in cls.EXTRA_LOSSES)

  @classmethod
  def reads(cls, moe=None) -> tuple:
    """The fields under model.moe it reads: derived from its settings and declarations."""
    del moe
    out = tuple(f'router.{f}' for f in cls.settings())
    if cls.USES_K:
      out += ('num_experts_per_tok',)
    if cls.SELECTION_BIAS:
      out += SELECTION_BIAS_FIELDS
    return out + tuple(f for loss in cls.losses() for f in loss.fields)

  @classmethod
  def check(cls, moe, fail):
    """fail(field, value, fix) for a setting this router cannot work with."""

  @classmethod
  def state_init(cls, moe) -> dict:
    """{name: initial array} of the layer state this router keeps (none by default)."""
    del moe
    return {}

  @classmethod
  def state_update(cls, state: dict, routing, moe) -> dict:
    """{name: delta} of its state after a training step on the whole (global) batch; the
    layer returns them (collection 'bias_updates') and the train step adds them."""
    del state, routing, moe
    return {}

  @classmethod
  def bias_size(cls, moe) -> int:
    """The experts the selection bias covers (SELECTION_BIAS routers): N by default."""
    return moe.num_experts

  @classmethod
  def expected_experts(cls, moe) -> float:
    """The routed experts a token uses on average (its FLOPs): K unless it says otherwise."""
    return float(moe.num_experts_per_tok)

  @classmethod
  def causal(cls, moe, train: bool) -> bool:
    """Whether a token's routing ignores later tokens of the call."""
    del moe, train
    return True

  @classmethod
  def uses_dispatch(cls, moe, train: bool) -> bool:
    """Whether its routing goes through the configured dispatcher (else OWN_DISPATCH)."""
    del moe, train
    return True


class LearnedRouter(Router):
  """A router with a weight matrix: logits = x W_r in float32 (router_logits).

  dtype: the router matmul's dtype (scores are always float32).
  jitter: Switch's input jitter, x * U(1 - eps, 1 + eps) while training.
  freeze: no gradient reaches the router weights (fine-tuning; the optimizer skips them too).
  logit_bias: a learned bias added to the logits (parameter 'b' [num_experts]); unlike the
    balance strategies' selection bias it changes the weights too and is trained by gradient.
  """
  dtype: str = 'float32'
  jitter: float = 0.0
  freeze: bool = False
  logit_bias: bool = False

  DTYPES = ('float32', 'bfloat16')
  EXTRA_LOSSES = ('simbal_loss',)  # on the weight matrix a learned router has

  @classmethod
  def check(cls, moe, fail):
    r = moe.router
    if r.dtype not in cls.DTYPES:
      fail('model.moe.router.dtype', r.dtype, f'must be one of {list(cls.DTYPES)}')
    if not r.jitter >= 0:
      fail('model.moe.router.jitter', r.jitter, 'must be >= 0')

  def logits(self, x, num_experts: int, train: bool):
    """x [T, D] -> logits [T, num_experts] float32, from the parameter 'w' [D, num_experts]."""
    w = param_with_axes(self, 'w', (x.shape[-1], num_experts), ('embed', 'router_expert'))
    dtype = jnp.dtype(self.dtype)
    x = x.astype(dtype)
    if train and self.jitter > 0:
      eps = self.jitter
      x = x * jax.random.uniform(self.make_rng('router'), x.shape, dtype, 1 - eps, 1 + eps)
    b = (param_with_axes(self, 'b', (num_experts,), ('router_expert',), nn.initializers.zeros)
         if self.logit_bias else None)
    if self.freeze:
      w, b = jax.lax.stop_gradient(w), None if b is None else jax.lax.stop_gradient(b)
    logits = jnp.dot(x, w.astype(dtype)).astype(jnp.float32)
    return logits if b is None else logits + b


class ScoreRouter(LearnedRouter):
  """Token choice by score: the top-K of the scores plus the selection bias, after
  group-limited selection (DeepSeek-V2/V3: experts split into num_groups groups, and only the
  best topk_groups groups may be chosen; group_score 'top2_sum' (V3) sums a group's two best
  scores, 'max' (V2) takes its best; 'auto': top2_sum for sigmoid scores, else max)."""
  num_groups: int = 1
  topk_groups: int = 1
  group_score: str = 'auto'

  SELECTION_BIAS = True
  GROUP_SCORES = ('auto', 'top2_sum', 'max')

  @classmethod
  def check(cls, moe, fail):
    super().check(moe, fail)
    check_groups(moe, fail)

  def resolved_group_score(self) -> str:
    return resolve_group_score(self.group_score, getattr(self, 'score_fn', 'softmax'))

  def select(self, scores, bias=None):
    """Top-K of (scores + selection bias [N]) after group limiting -> index [T, K]. The bias
    (the loss-free balancing state, moe/balance.py) changes selection only."""
    return select_experts(scores, self.k, self.num_groups, self.topk_groups,
                          self.resolved_group_score(), bias)


def check_groups(moe, fail):
  """The checks of group-limited selection."""
  r, n = moe.router, moe.num_experts
  for field in ('num_groups', 'topk_groups'):
    if not r[field] >= 1:
      fail(f'model.moe.router.{field}', r[field], 'must be a positive number')
  if r.group_score not in ScoreRouter.GROUP_SCORES:
    fail('model.moe.router.group_score', r.group_score,
         f'must be one of {list(ScoreRouter.GROUP_SCORES)}')
  if n % r.num_groups:
    fail('model.moe.router.num_groups', r.num_groups, f'must divide model.moe.num_experts={n}')
  if r.topk_groups > r.num_groups:
    fail('model.moe.router.topk_groups', r.topk_groups,
         f'cannot exceed model.moe.router.num_groups={r.num_groups}')
  reachable = r.topk_groups * n // r.num_groups
  if r.num_groups > 1 and moe.num_experts_per_tok > reachable:
    fail('model.moe.router.topk_groups', r.topk_groups,
         f'the kept groups hold {reachable} experts, fewer than num_experts_per_tok='
         f'{moe.num_experts_per_tok}; keep more groups')
  if (r.num_groups > 1 and n // r.num_groups < 2 and
      resolve_group_score(r.group_score, r.score_fn) == 'top2_sum'):
    fail('model.moe.router.group_score', r.group_score,
         "'top2_sum' needs at least 2 experts per group; use 'max' or fewer groups")


def resolve_group_score(group_score: str, score_fn: str) -> str:
  """'auto': 'top2_sum' (DeepSeek-V3) for sigmoid scores, else 'max' (DeepSeek-V2)."""
  if group_score == 'auto':
    return 'top2_sum' if score_fn == 'sigmoid' else 'max'
  return group_score


def group_limited(choice, num_groups: int, topk_groups: int, group_score: str):
  """Keep the experts of the best `topk_groups` of `num_groups` groups; mask the rest with -inf.

  Args:
    choice: [T, N] the selection scores.
  Returns:
    [T, N]: choice where the expert's group is kept, -inf elsewhere.
  """
  if num_groups <= 1 or topk_groups >= num_groups:
    return choice
  t, n = choice.shape
  grouped = choice.reshape(t, num_groups, n // num_groups)  # [T, G, N/G]
  if group_score == 'top2_sum':
    score = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [T, G]
  else:
    score = jnp.max(grouped, axis=-1)  # [T, G]
  _, keep = jax.lax.top_k(score, topk_groups)  # [T, M]
  kept = jnp.zeros((t, num_groups), bool).at[jnp.arange(t)[:, None], keep].set(True)
  return jnp.where(kept[:, :, None], grouped, -jnp.inf).reshape(t, n)


def select_experts(scores, k: int, num_groups: int = 1, topk_groups: int = 1,
                   group_score: str = 'max', bias=None):
  """Top-K of (scores [T, N] + selection bias [N]) after group limiting -> index [T, K] int32.
  The selection carries no gradient."""
  choice = scores if bias is None else scores + bias
  choice = group_limited(choice, num_groups, topk_groups, group_score)
  _, index = jax.lax.top_k(jax.lax.stop_gradient(choice), k)  # [T, K]
  return index.astype(jnp.int32)
