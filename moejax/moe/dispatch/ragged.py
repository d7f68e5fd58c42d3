"""Dropless expert parallelism with exact-size exchanges (dispatch.name='ragged_all_to_all').

Each device sorts its (token, choice) pairs by expert, which groups them by the rank holding
the expert; one `jax.lax.ragged_all_to_all` sends rank j exactly its pairs, the receiver runs
its N / EP experts dropless on what arrived, and a second one sends the outputs back to where
the pairs came from. Bytes moved are exactly the routed pairs (K per token, not deduplicated),
against the ring's all-gather of every token.

XLA:CPU does not implement ragged-all-to-all, so config validation refuses this dispatch on
CPU before compiling; the tests run the same code with `emulate_ragged_all_to_all`, a
transcription of the collective's documented semantics (`jax.lax.ragged_all_to_all`'s
docstring pseudocode) over fixed-size all_to_all buffers, on 8 simulated devices.

Receive buffers are static: EP x T_device x K rows, the most one rank can receive.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from moejax.moe.dispatch.base import register
from moejax.moe.dispatch.ep import DroplessEP
from moejax.parallel.mesh import mesh_platform


def exchange_plan(sizes, me):
  """sizes [EP src, EP dst]: pairs every rank sends every rank (its rows are contiguous and in
  destination order on the sender, and arrive in source order on the receiver). For rank `me`:
  the sending offsets into its own buffer, where its slices land on each receiver, and the
  sizes it receives from each source."""
  send = sizes[me]  # [EP]
  input_offsets = jnp.cumsum(send) - send
  output_offsets = (jnp.cumsum(sizes, axis=0) - sizes)[me]  # sum over sources before me
  recv_sizes = sizes[:, me]
  return input_offsets, send, output_offsets, recv_sizes


def emulate_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                              recv_sizes, *, axis_name):
  """jax.lax.ragged_all_to_all (one slice per device) over padded all_to_all buffers."""
  m, d = operand.shape
  rows = jnp.arange(m)
  idx = jnp.clip(input_offsets[:, None] + rows[None, :], 0, m - 1)  # [EP, M]
  chunks = jnp.where((rows[None, :] < send_sizes[:, None])[..., None], operand[idx], 0)
  recv = jax.lax.all_to_all(chunks, axis_name, 0, 0)  # [EP src, M, D]
  offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # in my output
  dest = jnp.where(rows[None, :] < recv_sizes[:, None], offsets[:, None] + rows[None, :],
                   output.shape[0])
  return output.at[dest.reshape(-1)].set(recv.reshape(-1, d), mode='drop')


def ragged_local(x, index, gate, num_experts: int, ep: int, exchange, grouped):
  """One device's part inside shard_map over the 'expert' axis: x [Tl, D] -> y [Tl, D]."""
  t, k = index.shape
  per = num_experts // ep
  d = x.shape[-1]
  flat = index.reshape(-1)  # [A = Tl * K]
  order = jnp.argsort(flat, stable=True)  # by expert, hence by destination rank
  counts = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1, mode='drop')  # [N]; null: none
  me = jax.lax.axis_index('expert')
  sizes = jax.lax.all_gather(counts.reshape(ep, per).sum(-1), 'expert')  # [EP src, EP dst]
  input_offsets, send_sizes, output_offsets, recv_sizes = exchange_plan(sizes, me)
  # Pairs per local expert from each source: [EP src, per].
  from_src = jax.lax.all_to_all(counts.reshape(ep, per), 'expert', 0, 0)
  capacity = ep * t * k
  buf = exchange(x[order // k], jnp.zeros((capacity, d), x.dtype), input_offsets, send_sizes,
                 output_offsets, recv_sizes, axis_name='expert')  # [cap, D] in source order
  # The local expert of every received row: source chunks are contiguous, each sorted by expert.
  rows = jnp.arange(capacity)
  chunk_end = jnp.cumsum(recv_sizes)
  src = jnp.minimum(jnp.searchsorted(chunk_end, rows, side='right'), ep - 1)
  within = rows - (chunk_end - recv_sizes)[src]
  expert = jnp.sum(within[:, None] >= jnp.cumsum(from_src, axis=1)[src], axis=1)  # [cap]
  expert = jnp.where(rows < chunk_end[-1], expert, per)  # past the chunks: parked
  order2 = jnp.argsort(expert, stable=True)
  y_sorted = grouped(buf[order2], jnp.sum(from_src, axis=0))  # parked rows stay zero
  y_buf = jnp.zeros_like(y_sorted).at[order2].set(y_sorted, unique_indices=True)
  # Back to the senders: my chunk from source s (at its receive offset) goes to where s's
  # pairs for me started in its sorted buffer.
  back_offsets = (jnp.cumsum(sizes, axis=1) - sizes)[:, me]
  back = exchange(y_buf, jnp.zeros((t * k, d), y_buf.dtype), chunk_end - recv_sizes,
                  recv_sizes, back_offsets, send_sizes, axis_name='expert')  # [A, D] sorted
  y_assign = jnp.zeros_like(back).at[order].set(back, unique_indices=True).reshape(t, k, d)
  return jnp.einsum('tkd,tk->td', y_assign, gate.astype(y_assign.dtype))


@register('ragged_all_to_all')
@dataclasses.dataclass(frozen=True)
class RaggedAllToAllDispatch(DroplessEP):
  """Exact-size exchanges of the (token, choice) pairs with ragged_all_to_all (TPU/GPU)."""
  # The collective: jax.lax.ragged_all_to_all (TPU/GPU); the tests give the emulation.
  collective: Callable = jax.lax.ragged_all_to_all

  @classmethod
  def reads(cls) -> tuple:
    return cls.READS  # `collective` is not a config field

  @classmethod
  def check(cls, config, fail):
    if mesh_platform() == 'cpu':
      fail('model.moe.dispatch.name', 'ragged_all_to_all', "XLA:CPU has no ragged-all-to-all "
           "(it runs on TPU and GPU); on CPU use 'ring' (dropless across devices) or "
           "'dropless'")

  def exchange(self, x, index, gates, local, num_experts: int, ep: int):
    return ragged_local(x, index, gates, num_experts, ep, self.collective, local.grouped)
