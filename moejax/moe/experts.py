"""The routed experts: N SwiGLU FFNs held as stacked weights [N, ...].

Two entry points, one per dispatch family:
- `capacity(buffers [N, C, D])`: every expert processes a fixed-size buffer (batched einsum).
- `grouped(x_sorted [M, D], group_sizes [N])`: rows sorted by expert, group e has
  group_sizes[e] rows (dropless). Backends: 'ragged_dot' (jax.lax.ragged_dot, the TPU/GPU
  grouped matmul) and 'blocked' (rows padded per expert to blocks of `block_size` rows and a
  loop over blocks; the exact path for CPU, where ragged_dot is much slower than a dense matmul
  of the same FLOPs and its backward pass runs out of memory at `moejax.bench`'s shape).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.model.layers import param_with_axes


class RoutedExperts(nn.Module):
  num_experts: int
  d_model: int
  d_ff: int
  dtype: jnp.dtype = jnp.float32
  backend: str = 'auto'
  block_size: int = 128

  def setup(self):
    e, d, f = self.num_experts, self.d_model, self.d_ff
    init_in = nn.initializers.normal(stddev=d ** -0.5)
    init_out = nn.initializers.normal(stddev=f ** -0.5)
    self.wi_0 = param_with_axes(self, 'wi_0', (e, d, f), ('expert', 'embed', 'expert_mlp'), init_in)
    self.wi_1 = param_with_axes(self, 'wi_1', (e, d, f), ('expert', 'embed', 'expert_mlp'), init_in)
    self.wo = param_with_axes(self, 'wo', (e, f, d), ('expert', 'expert_mlp', 'embed'), init_out)

  def weights(self):
    """(wi_0 [N, D, F], wi_1 [N, D, F], wo [N, F, D]) in the compute dtype, for dispatchers
    that run the experts on a shard of them (e.g. inside shard_map)."""
    return tuple(jnp.asarray(w, self.dtype) for w in (self.wi_0, self.wi_1, self.wo))

  def capacity(self, buffers):
    x = nn.with_logical_constraint(buffers.astype(self.dtype), ('expert', None, 'act_embed'))
    return swiglu_experts(x, *self.weights())  # [N, C, D]

  def grouped(self, x_sorted, group_sizes):
    return grouped_swiglu(x_sorted.astype(self.dtype), group_sizes, *self.weights(),
                          backend=self.backend, block_size=self.block_size)


def grouped_swiglu(x_sorted, group_sizes, wi_0, wi_1, wo, backend: str = 'auto',
                   block_size: int = 128):
  """Rows sorted by expert [M, D], group e holds group_sizes[e] rows -> [M, D]. Rows past
  sum(group_sizes) belong to no expert and come out zero (dispatchers park rows there)."""
  if resolve_backend(backend) == 'ragged_dot':
    rd = functools.partial(jax.lax.ragged_dot, group_sizes=group_sizes)
    h = jax.nn.silu(rd(x_sorted, wi_0)) * rd(x_sorted, wi_1)
    valid = jnp.arange(x_sorted.shape[0]) < jnp.sum(group_sizes)
    return jnp.where(valid[:, None], rd(h, wo), 0)
  return blocked_swiglu(x_sorted, group_sizes, wi_0, wi_1, wo, block_size)


def swiglu_experts(x, wi_0, wi_1, wo):
  """Every expert on its own rows: x [E, R, D], weights [E, D, F] / [E, F, D] -> [E, R, D]."""
  h = jax.nn.silu(jnp.einsum('erd,edf->erf', x, wi_0)) * jnp.einsum('erd,edf->erf', x, wi_1)
  return jnp.einsum('erf,efd->erd', h, wo)


def resolve_backend(backend: str) -> str:
  if backend != 'auto':
    return backend
  return 'blocked' if jax.default_backend() == 'cpu' else 'ragged_dot'


def blocked_swiglu(x_sorted, group_sizes, wi_0, wi_1, wo, block: int):
  """Grouped SwiGLU: pad each expert's rows to whole blocks and run one expert per block."""
  m, d = x_sorted.shape
  e = group_sizes.shape[0]
  num_blocks = -(-m // block) + e  # static bound: sum_e ceil(g_e / B) <= ceil(M / B) + N.
  blocks_per = (group_sizes + block - 1) // block  # [N]
  block_end = jnp.cumsum(blocks_per)  # [N]
  row_start = jnp.cumsum(group_sizes) - group_sizes  # [N]
  rows = jnp.arange(m)
  row_expert = jnp.minimum(jnp.searchsorted(jnp.cumsum(group_sizes), rows, side='right'),
                           e - 1)  # [M]
  dest = (block_end - blocks_per)[row_expert] * block + rows - row_start[row_expert]
  # Rows past every group go to one extra slot, which reads zeros and is never computed.
  dest = jnp.where(rows < jnp.sum(group_sizes), dest, num_blocks * block)
  src = jnp.full((num_blocks * block + 1,), m, jnp.int32).at[dest].set(
      jnp.arange(m, dtype=jnp.int32))[:-1]
  block_expert = jnp.minimum(jnp.searchsorted(block_end, jnp.arange(num_blocks), side='right'),
                             e - 1).astype(jnp.int32)  # [num_blocks]
  x_pad = jnp.concatenate([x_sorted, jnp.zeros((1, d), x_sorted.dtype)])[src]
  y_pad = _block_ffn(x_pad.reshape(num_blocks, block, d), block_expert, block_end[-1],
                     wi_0, wi_1, wo)
  y_pad = jnp.concatenate([y_pad.reshape(num_blocks * block, d), jnp.zeros((1, d), y_pad.dtype)])
  return y_pad[dest]  # [M, D]


def _block_forward(xb, w0, w1, wo):
  a, c = xb @ w0, xb @ w1
  return (jax.nn.silu(a) * c) @ wo


@jax.custom_vjp
def _block_ffn(xb, block_expert, used, wi_0, wi_1, wo):
  def body(_, inp):
    x, ex, i = inp
    y = jax.lax.cond(i < used, lambda: _block_forward(x, wi_0[ex], wi_1[ex], wo[ex]),
                     lambda: jnp.zeros_like(x))
    return None, y
  _, y = jax.lax.scan(body, None, (xb, block_expert, jnp.arange(xb.shape[0])))
  return y


def _block_ffn_fwd(xb, block_expert, used, wi_0, wi_1, wo):
  return _block_ffn(xb, block_expert, used, wi_0, wi_1, wo), (xb, block_expert, used, wi_0, wi_1, wo)


def _block_ffn_bwd(res, gy):
  # Weight gradients are accumulated in place, one expert slice per block; activations are
  # recomputed per block, so the only residual is the padded input.
  xb, block_expert, used, wi_0, wi_1, wo = res

  def body(grads, inp):
    x, g, ex, i = inp

    def compute(grads):
      d0, d1, do = grads
      w0, w1, w2 = wi_0[ex], wi_1[ex], wo[ex]
      a, c = x @ w0, x @ w1
      sig = jax.nn.sigmoid(a)
      sa = a * sig
      dh = g @ w2.T
      da = dh * c * sig * (1 + a * (1 - sig))  # silu'(a)
      dc = dh * sa
      d0 = d0.at[ex].add(x.T @ da)
      d1 = d1.at[ex].add(x.T @ dc)
      do = do.at[ex].add((sa * c).T @ g)
      return (d0, d1, do), da @ w0.T + dc @ w1.T

    return jax.lax.cond(i < used, compute, lambda gr: (gr, jnp.zeros_like(x)), grads)

  zeros = tuple(jnp.zeros_like(w) for w in (wi_0, wi_1, wo))
  grads, dx = jax.lax.scan(body, zeros, (xb, gy, block_expert, jnp.arange(xb.shape[0])))
  return (dx, None, None) + grads


_block_ffn.defvjp(_block_ffn_fwd, _block_ffn_bwd)
