"""Balance losses and routing statistics, computed from a RouterOutput.

Counts are taken over every token the layer sees in one call. Under jit with a sharded batch
these are global sums (GSPMD inserts the reductions), so statistics do not depend on the mesh.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.moe.routers import RouterOutput


def expert_counts(expert_index, num_experts: int):
  """Tokens routed to each expert (before any capacity drop): [N] float32."""
  return jnp.zeros((num_experts,), jnp.float32).at[expert_index.reshape(-1)].add(1.0)


def switch_aux_loss(r: RouterOutput, num_experts: int):
  """Switch/GShard: N * sum_i f_i P_i, with f_i = count_i / (K T) and P_i = mean_t p_{t,i}.

  Equals 1 under uniform routing (multiply by the weight alpha).
  """
  t, k = r.expert_index.shape
  f = expert_counts(r.expert_index, num_experts) / (k * t)  # [N]
  p = jnp.mean(r.probs, axis=0)  # [N]
  # f comes from a discrete choice: it carries no gradient, P does (as in the papers).
  return num_experts * jnp.sum(jax.lax.stop_gradient(f) * p)


def sequence_aux_loss(r: RouterOutput, num_experts: int, batch: int):
  """DeepSeek-V3 sequence-wise loss: per sequence, sum_i f_i P_i with
  f_i = N / (K S) * count_i(sequence) and P_i = mean over the sequence of the normalised
  affinities; averaged over sequences. Equals 1 under uniform routing (times its weight)."""
  t, k = r.expert_index.shape
  s = t // batch
  index = r.expert_index.reshape(batch, s * k)
  counts = jax.vmap(lambda i: jnp.zeros((num_experts,), jnp.float32).at[i].add(1.0))(index)
  f = jax.lax.stop_gradient(counts) * num_experts / (k * s)  # [B, N]
  p = jnp.mean(r.probs.reshape(batch, s, num_experts), axis=1)  # [B, N]
  return jnp.mean(jnp.sum(f * p, axis=-1))


def router_z_loss(r: RouterOutput):
  """ST-MoE: mean_t (logsumexp_i logits_{t,i})^2."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(r.logits, axis=-1)))


def load_stats(r: RouterOutput, num_experts: int) -> dict:
  counts = expert_counts(r.expert_index, num_experts)
  load = counts / jnp.sum(counts)  # [N] fraction of routed assignments per expert.
  mean = jnp.mean(counts)
  return {
      'expert_load': load,
      'max_vio': (jnp.max(counts) - mean) / mean,
      'cv': jnp.std(counts) / mean,
      'router_entropy': jnp.mean(-jnp.sum(r.probs * jnp.log(r.probs + 1e-9), axis=-1)),
  }
