"""The 'blocked' backend of the dropless experts: exact grouped SwiGLU for CPU, where
jax.lax.ragged_dot is far slower than a dense matmul of the same FLOPs.

Rows sorted by expert are laid out in blocks of `block` rows, each block holding rows of one
expert only (a group of g rows takes ceil(g / block) blocks), and a scan runs one expert's
SwiGLU per block; blocks past the used ones are skipped by lax.cond.

Two kernels share that layout:
- `blocked_swiglu(x_sorted, group_sizes, ...)`: rows already sorted by expert (the ragged
  all-to-all path receives them so). Backward recomputes activations per block.
- `fused_dropless(x, expert_index, gates, ...)`: the whole dropless MoE output. Each block
  gathers its tokens from x, and scatter-adds gate * expert(x) into y, so no sorted copy of the
  T*K assignments, nor of their outputs, is ever built; backward reuses the forward's SwiGLU
  inputs (saved per block, T*K*F*2 numbers, less than a dense FFN of the same active width
  saves) and gets the gate gradient from the same matmul as the activations' gradient.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def auto_block(rows: int, num_experts: int, width: int, lo: int = 16) -> int:
  """block_size 0: the mean rows per expert rounded up to a power of two (fewer, fuller blocks
  fetch each expert's weights fewer times, and padding stays below one block per expert), but
  at most 2^16 / width rows (a power of two), so a block of inputs stays within 256 KB of
  float32 and in cache; at least `lo`. At d_model 512 that is 128 rows, at 128 it is 512
  (measured: `python -m moejax.bench moe|train --block_size B`, docs/benchmarks.md)."""
  mean = max(1, -(-rows // num_experts))
  cache = 1 << max(0, (65536 // max(width, 1)).bit_length() - 1)
  return max(lo, min(1 << (mean - 1).bit_length(), cache))


def block_plan(group_sizes, num_rows: int, block: int):
  """Block layout of `num_rows` rows sorted by expert, group e holding group_sizes[e] of them.

  Returns (dest [num_rows]: each row's position in the padded layout, num_blocks * block for
  rows past every group; block_expert [num_blocks]; used: blocks actually holding rows; the
  static num_blocks = ceil(num_rows / block) + N, which bounds sum_e ceil(g_e / block)).
  """
  e = group_sizes.shape[0]
  num_blocks = -(-num_rows // block) + e
  blocks_per = (group_sizes + block - 1) // block  # [N]
  block_end = jnp.cumsum(blocks_per)  # [N]
  row_end = jnp.cumsum(group_sizes)
  row_start = row_end - group_sizes  # [N]
  rows = jnp.arange(num_rows)
  row_expert = jnp.minimum(jnp.searchsorted(row_end, rows, side='right'), e - 1)  # [M]
  dest = (block_end - blocks_per)[row_expert] * block + rows - row_start[row_expert]
  dest = jnp.where(rows < row_end[-1], dest, num_blocks * block)
  block_expert = jnp.minimum(jnp.searchsorted(block_end, jnp.arange(num_blocks), side='right'),
                             e - 1).astype(jnp.int32)  # [num_blocks]
  return dest, block_expert, block_end[-1], num_blocks


def blocked_swiglu(x_sorted, group_sizes, wi_0, wi_1, wo, block: int):
  """Grouped SwiGLU of rows sorted by expert [M, D] -> [M, D]; rows past the groups give 0."""
  return _blocked(x_sorted, group_sizes, block,
                  lambda xb, be, used: _block_ffn(xb, be, used, wi_0, wi_1, wo))


def blocked_ffn(x_sorted, group_sizes, expert_fn, weights, block: int):
  """Any expert block on rows sorted by expert [M, D] -> [M, D] (rows past the groups give 0):
  expert_fn(x [block, D], *(w[e] for w in weights)) per block, differentiated by autodiff (the
  SwiGLU block has its hand-written backward pass instead)."""
  def run(xb, block_expert, used):
    def body(_, inp):
      x, ex, i = inp
      y = jax.lax.cond(i < used, lambda: expert_fn(x, *(w[ex] for w in weights)),
                       lambda: jnp.zeros_like(x))
      return None, y
    return jax.lax.scan(body, None, (xb, block_expert, jnp.arange(xb.shape[0])))[1]
  return _blocked(x_sorted, group_sizes, block, run)


def _blocked(x_sorted, group_sizes, block: int, run):
  """Lay rows sorted by expert out in blocks of one expert each, run(blocks [B, block, D],
  block_expert [B], used) on them, and bring the rows back in order."""
  m, d = x_sorted.shape
  block = block or auto_block(m, group_sizes.shape[0], d)
  dest, block_expert, used, num_blocks = block_plan(group_sizes, m, block)
  # Rows past every group go to one extra slot, which reads zeros and is never computed.
  src = jnp.full((num_blocks * block + 1,), m, jnp.int32).at[dest].set(
      jnp.arange(m, dtype=jnp.int32))[:-1]
  x_pad = jnp.concatenate([x_sorted, jnp.zeros((1, d), x_sorted.dtype)])[src]
  y_pad = run(x_pad.reshape(num_blocks, block, d), block_expert, used)
  y_pad = jnp.concatenate([y_pad.reshape(num_blocks * block, d), jnp.zeros((1, d), y_pad.dtype)])
  return y_pad[dest]  # [M, D]


def fused_dropless(x, expert_index, gates, num_local: int, first, wi_0, wi_1, wo, block: int,
                   num_experts: int | None = None):
  """sum over each token's choices among experts first .. first + num_local - 1 of
  gate * SwiGLU_e(x): x [T, D], expert_index and gates [T, K], weights of those experts
  [num_local, ...] -> [T, D]. Choices of other experts add nothing (expert parallelism).
  block 0: auto_block over the num_experts (default num_local) experts the choices go to."""
  t, d = x.shape
  k = expert_index.shape[1]
  pairs = t * k
  block = block or auto_block(pairs, num_experts or num_local, d)
  local = expert_index - first
  flat = jnp.where((local >= 0) & (local < num_local), local, num_local).reshape(-1)  # [P]
  order = jnp.argsort(flat, stable=True)  # pair ids sorted by expert, other experts' last
  sizes = jnp.zeros((num_local,), jnp.int32).at[flat].add(1, mode='drop')
  dest, block_expert, used, num_blocks = block_plan(sizes, pairs, block)
  slot_pair = jnp.full((num_blocks * block + 1,), pairs, jnp.int32).at[dest].set(
      order.astype(jnp.int32))[:-1]  # [S] the pair in each slot; P: empty
  slot_token = jnp.where(slot_pair < pairs, slot_pair // k, t)  # T: the zero row
  slot_gate = jnp.concatenate([gates.reshape(-1).astype(x.dtype), jnp.zeros((1,), x.dtype)])
  slot_gate = slot_gate[slot_pair]  # [S]; differentiable, 0 in empty slots
  shape = (num_blocks, block)
  return _fused(x, slot_gate.reshape(shape), slot_token.reshape(shape), block_expert, used,
                wi_0, wi_1, wo)


def _swiglu_in(xb, w0, w1):
  return xb @ w0, xb @ w1  # [B, F] each


def _fused_scan(x, gate, token, block_expert, used, wi_0, wi_1, wo, keep: bool):
  t, d = x.shape
  b, f = gate.shape[1], wi_0.shape[2]
  x_ext = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])

  def body(y, inp):
    tok, g, ex, i = inp

    def run(y):
      a, c = _swiglu_in(x_ext[tok], wi_0[ex], wi_1[ex])
      out = (jax.nn.silu(a) * c) @ wo[ex]  # [B, D]
      return y.at[tok].add(out * g[:, None]), (a, c) if keep else None

    def skip(y):
      return y, (jnp.zeros((b, f), a_dtype), jnp.zeros((b, f), a_dtype)) if keep else None

    return jax.lax.cond(i < used, run, skip, y)

  a_dtype = jnp.result_type(x.dtype, wi_0.dtype)
  y, saved = jax.lax.scan(body, jnp.zeros((t + 1, d), x.dtype),
                          (token, gate, block_expert, jnp.arange(gate.shape[0])))
  return y[:t], saved


@jax.custom_vjp
def _fused(x, gate, token, block_expert, used, wi_0, wi_1, wo):
  return _fused_scan(x, gate, token, block_expert, used, wi_0, wi_1, wo, keep=False)[0]


def _fused_fwd(x, gate, token, block_expert, used, wi_0, wi_1, wo):
  y, (a, c) = _fused_scan(x, gate, token, block_expert, used, wi_0, wi_1, wo, keep=True)
  return y, (x, gate, token, block_expert, used, wi_0, wi_1, wo, a, c)


def _fused_bwd(res, gy):
  x, gate, token, block_expert, used, wi_0, wi_1, wo, a_all, c_all = res
  t, d = x.shape
  x_ext = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])
  gy_ext = jnp.concatenate([gy, jnp.zeros((1, d), gy.dtype)])

  def body(carry, inp):
    tok, g, ex, i, a, c = inp

    def run(carry):
      dx, d0, d1, do = carry
      xb, gyb = x_ext[tok], gy_ext[tok]  # [B, D]
      sig = jax.nn.sigmoid(a)
      sa = a * sig  # silu(a)
      h = sa * c  # [B, F]
      u = gyb @ wo[ex].T  # [B, F]: d(out) / d(h) before the gate
      dgate = jnp.sum(h * u, axis=-1)  # [B]
      dh = u * g[:, None]
      da = dh * c * sig * (1 + a * (1 - sig))  # silu'(a)
      dc = dh * sa
      do = do.at[ex].add(h.T @ (gyb * g[:, None]))
      d0 = d0.at[ex].add(xb.T @ da)
      d1 = d1.at[ex].add(xb.T @ dc)
      dx = dx.at[tok].add(da @ wi_0[ex].T + dc @ wi_1[ex].T)
      return (dx, d0, d1, do), dgate.astype(g.dtype)

    return jax.lax.cond(i < used, run, lambda cr: (cr, jnp.zeros_like(g)), carry)

  init = (jnp.zeros((t + 1, d), x.dtype),) + tuple(jnp.zeros_like(w) for w in (wi_0, wi_1, wo))
  (dx, d0, d1, do), dgate = jax.lax.scan(
      body, init, (token, gate, block_expert, jnp.arange(gate.shape[0]), a_all, c_all))
  return dx[:t], dgate, None, None, None, d0, d1, do


_fused.defvjp(_fused_fwd, _fused_bwd)


def _block_forward(xb, w0, w1, wo):
  a, c = _swiglu_in(xb, w0, w1)
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
