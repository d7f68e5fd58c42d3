"""`python -m moejax.bench moe --json`: the MoE layer's forward + backward under jax.jit for
each dispatch path, and in the same run a dense SwiGLU FFN with the same active parameters
(hidden = (K + shared) * expert width), one JSON row per case.

Rows: case ('experts_floor': the same matmuls as N evenly loaded experts with no routing and no
dispatch, the bound any dispatch path meets at this shape), ms (median of --reps timed runs
after one warm-up run), ratio_to_dense, active GFLOP/s (the FLOPs a token really needs: 3
matmuls forward, x3 for forward + backward, over its K routed and its shared experts, plus the
router), temp_bytes (compiled temporary memory from memory_analysis()) and its ratio to the
dense FFN's, and dropped_fraction.

--routing=balanced|random replaces the router's choice by a forced one (every expert the same
load, or uniform random experts), so the dispatch and kernels are timed without the learned
router's imbalance, next to the learned routing's cost (--routing=learned, the default).
Also: --ragged_dot and --tokamax rows (the dropless kernels' grouped-matmul backends); the einsum
(GShard) path at --group_size; with --hf (needs the torch extra) Hugging Face's
DeepSeek-V3 MoE block on the same shape and our speed-up over it; and one 'all_to_all' row per
--meshes entry with the per-layer bytes each device sends in expert parallelism (planner.py).
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from moejax.config import base_config
from moejax.moe.experts.swiglu import SwiGLUExperts
from moejax.moe.layer import MoEFFN
from moejax.nn.layers import SwiGLU


def _time(fn, args, reps: int) -> float:
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times) * 1e3


ROUTINGS = ('learned', 'balanced', 'random')


def forced_routing(kind: str, tokens: int, k: int, num_experts: int, seed: int = 0):
  """[T, K] experts to route to instead of the router's choice (MaxText's and Megatron's
  forced routing for benchmarks): 'balanced', token t takes experts (t K + j) mod N, so every
  expert gets T K / N (within one); 'random', K distinct experts drawn uniformly per token."""
  if kind == 'balanced':
    return ((jnp.arange(tokens)[:, None] * k + jnp.arange(k)) % num_experts).astype(jnp.int32)
  keys = jax.random.split(jax.random.key(seed), tokens)
  return jax.vmap(lambda key: jax.random.permutation(key, num_experts)[:k])(keys).astype(
      jnp.int32)


def _fwd_bwd(module, x, cot, replay=None):
  def loss(params, x):
    y = module.apply(params, x) if replay is None else module.apply(params, x, None, True,
                                                                    replay)
    y, aux = (y if isinstance(y, tuple) else (y, {}))
    return jnp.sum(y * cot), aux.get('dropped_fraction', jnp.zeros(()))

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _moe_cfg(a, dispatch: str, backend: str = 'auto', factor: float = 1.25):
  moe = base_config().model.moe
  moe.dispatch.group_size = a.group_size
  moe.num_experts, moe.num_experts_per_tok = a.experts, a.top_k
  moe.expert_ffn_dim, moe.num_shared_experts = a.expert_dim, a.shared
  moe.dispatch.name, moe.experts.backend = dispatch, backend
  moe.dispatch.capacity_factor, moe.experts.block_size = factor, a.block_size
  return ml_collections.FrozenConfigDict(moe)


class ExpertsFloor(nn.Module):
  """What the MoE layer's matmuls alone cost at this shape: the T*K (token, choice) rows split
  evenly over the N experts as one batched SwiGLU [N, T*K/N, D], plus the shared experts; no
  router, no dispatch, no imbalance. Its ratio to the dense FFN is the price of running the
  same FLOPs as N small matmuls instead of one large one."""
  num_experts: int
  top_k: int
  expert_dim: int
  shared: int
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, s, d = x.shape
    t, n = b * s, self.num_experts
    rows = jnp.tile(x.reshape(t, d), (self.top_k, 1))  # [T*K, D]
    per = -(-rows.shape[0] // n)
    rows = jnp.pad(rows, ((0, n * per - rows.shape[0]), (0, 0)))
    experts = SwiGLUExperts(n, d, self.expert_dim, self.dtype, name='experts')
    y = experts.capacity(rows.reshape(n, per, d)).reshape(n * per, d)[:t * self.top_k]
    y = y.reshape(self.top_k, t, d).sum(0).reshape(b, s, d)
    if self.shared:
      y = y + SwiGLU(self.shared * self.expert_dim, self.dtype, name='shared')(x)
    return y


def bench_moe(a):
  """Yields one row per case, as soon as it is measured."""
  dtype = jnp.dtype(a.dtype)
  batch = max(1, a.tokens // a.seq)
  x = jax.random.normal(jax.random.key(0), (batch, a.seq, a.d_model), dtype)
  cot = jax.random.normal(jax.random.key(1), x.shape, dtype)
  active = a.top_k + a.shared
  flops = 3 * 2 * 3 * a.tokens * a.d_model * a.expert_dim * active  # SwiGLU, fwd + bwd
  flops += 3 * 2 * a.tokens * a.d_model * a.experts  # router
  cases = [('dense_ffn', SwiGLU(active * a.expert_dim, dtype)),
           ('experts_floor', ExpertsFloor(a.experts, a.top_k, a.expert_dim, a.shared, dtype))]
  cases.append(('dropless_blocked', MoEFFN(_moe_cfg(a, 'dropless', 'blocked'), a.d_model, dtype)))
  for backend in ('ragged_dot', 'tokamax'):
    if getattr(a, backend, False):
      cases.append((f'dropless_{backend}',
                    MoEFFN(_moe_cfg(a, 'dropless', backend), a.d_model, dtype)))
  for f in a.capacity_factors:
    cases.append((f'capacity_cf{f:g}', MoEFFN(_moe_cfg(a, 'capacity', factor=f), a.d_model,
                                               dtype)))
  if a.group_size:
    f = a.capacity_factors[0] if a.capacity_factors else 1.25
    cases.append((f'einsum_g{a.group_size}_cf{f:g}',
                  MoEFFN(_moe_cfg(a, 'einsum', factor=f), a.d_model, dtype)))
  dense = None
  routing = getattr(a, 'routing', 'learned')
  replay = None if routing == 'learned' else forced_routing(routing, batch * a.seq, a.top_k,
                                                            a.experts)
  for name, module in cases:
    params = nn.unbox(jax.jit(module.init)(jax.random.key(2), x))
    fn = _fwd_bwd(module, x, cot, replay if isinstance(module, MoEFFN) else None)
    compiled = fn.lower(params, x).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    (_, dropped), _ = jax.block_until_ready(fn(params, x))  # also the warm-up run
    ms = _time(fn, (params, x), a.reps)
    if dense is None:
      dense = (ms, temp)
    yield {
        'case': name, 'tokens': a.tokens, 'd_model': a.d_model, 'experts': a.experts,
        'expert_dim': a.expert_dim, 'top_k': a.top_k, 'shared': a.shared, 'dtype': a.dtype,
        'ms': round(ms, 2), 'ratio_to_dense': round(ms / dense[0], 3),
        'active_gflops_per_s': round(flops / ms / 1e6, 2),
        'temp_bytes': int(temp), 'temp_ratio_to_dense': round(temp / max(dense[1], 1), 3),
        'dropped_fraction': round(float(dropped), 4), 'routing': routing,
        'backend': jax.default_backend()}


def all_to_all_rows(a):
  """Per-layer expert-parallel traffic of this shape on each mesh in --meshes."""
  from moejax.costs.planner import all_to_all, parse_mesh
  c = base_config().model
  c.d_model, c.num_layers, c.first_k_dense = a.d_model, 1, 0
  c.moe = _moe_cfg(a, 'dropless').as_configdict()
  for spec in a.meshes:
    mesh = parse_mesh(spec)
    if a.experts % mesh['expert']:
      yield {'case': 'all_to_all', 'mesh': spec, 'skipped': f"expert axis {mesh['expert']} "
             f'does not divide {a.experts} experts'}
      continue
    per_device = a.tokens // (mesh['data'] * mesh['fsdp'] * mesh['expert'])
    out = all_to_all(c, mesh, per_device, 'bf16')
    yield {'case': 'all_to_all', 'mesh': spec, 'tokens_per_device': per_device,
           'dtype': 'bf16', **{k: v for k, v in out.items() if k != 'moe_layers'}}
