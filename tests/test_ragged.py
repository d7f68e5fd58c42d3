"""Dropless expert parallelism with exact-size exchanges (dispatch 'ragged_all_to_all'). XLA:CPU
has no ragged-all-to-all, so the path runs here with an emulation of the collective written
from its documented semantics; the offsets are checked by hand, the whole path against the
loop-over-experts reference (outputs) and the dropless path (gradients) on 8 devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from moejax.checks import validate
from moejax.errors import ConfigError
from moejax.kernels.grouped import dropless_combine
from moejax.kernels.grouped import grouped_swiglu
from moejax.moe.dispatch.ragged import emulate_ragged_all_to_all, exchange_plan, ragged_local

from conftest import tiny_config
from test_dispatch import loop_reference
from test_ring import _problem


def test_exchange_plan_hand_worked():
  """3 ranks; sizes[s, j] = pairs s sends j = [[1, 2, 0], [3, 0, 1], [2, 2, 2]].
  Rank 1 sends from its buffer at (0, 3, 3) sizes (3, 0, 1); its slices land after what lower
  ranks send the same receiver: (1, 2, 0); it receives (2, 0, 2) from ranks 0, 1, 2."""
  sizes = jnp.array([[1, 2, 0], [3, 0, 1], [2, 2, 2]])
  got = [np.asarray(a).tolist() for a in exchange_plan(sizes, 1)]
  assert got == [[0, 3, 3], [3, 0, 1], [1, 2, 0], [2, 0, 2]]


def test_emulation_matches_the_documented_example():
  """jax.lax.ragged_all_to_all's docstring example (axis of size 2)."""
  mesh = Mesh(np.asarray(jax.devices()[:2]), ('x',))
  operand = jnp.array([[1, 2, 2], [3, 4, 0]], jnp.float32)[..., None]
  output = jnp.zeros((2, 4, 1))
  args = dict(input_offsets=[[0, 1], [0, 1]], send_sizes=[[1, 2], [1, 1]],
              output_offsets=[[0, 0], [1, 2]], recv_sizes=[[1, 1], [2, 1]])
  args = {k: jnp.array(v, jnp.int32) for k, v in args.items()}

  def f(op, out, io, ss, oo, rs):
    return emulate_ragged_all_to_all(op[0], out[0], io[0], ss[0], oo[0], rs[0],
                                     axis_name='x')[None]
  run = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P('x'),) * 6, out_specs=P('x')))
  got = run(operand, output, args['input_offsets'], args['send_sizes'],
            args['output_offsets'], args['recv_sizes'])[..., 0]
  np.testing.assert_array_equal(got, [[1, 3, 0, 0], [2, 2, 4, 0]])


@pytest.mark.parametrize('mesh_shape,nulls', [((1, 8), False), ((2, 4), False), ((2, 4), True)])
def test_ragged_path_on_8_devices(mesh_shape, nulls):
  """(expert=8) and (data=2, expert=4): the outputs equal the loop reference, and gradients
  (tokens and expert weights) equal the dropless path's on one device; null slots (index N)
  are sent nowhere."""
  x, index, gates, w = _problem(t=32, n=8, k=2, nulls=nulls)
  mesh = Mesh(np.asarray(jax.devices()).reshape(mesh_shape), ('data', 'expert'))
  ep = mesh_shape[1]
  weights = tuple(jnp.asarray(w[k]) for k in ('wi_0', 'wi_1', 'wo'))

  def sharded(x, weights):
    def local(x, index, gate, wi_0, wi_1, wo):
      run = lambda xs, s: grouped_swiglu(xs, s, wi_0, wi_1, wo, 'blocked', 4)  # noqa
      return ragged_local(x, index, gate, 8, ep, emulate_ragged_all_to_all, run)
    tokens = P(('data', 'expert'))
    return jax.shard_map(local, mesh=mesh, in_specs=(tokens,) * 3 + (P('expert'),) * 3,
                         out_specs=tokens, check_vma=False)(x, index, gates, *weights)

  def single(x, weights):
    run = lambda xs, s: grouped_swiglu(xs, s, *weights, 'blocked', 4)  # noqa
    return dropless_combine(x, jnp.asarray(index), jnp.asarray(gates), 8, 0, run)

  y = jax.jit(sharded)(jnp.asarray(x), weights)
  np.testing.assert_allclose(y, loop_reference(x, index, gates, w), rtol=2e-5, atol=2e-6)
  cot = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
  loss = lambda f: lambda x, ws: jnp.sum(f(x, ws) * cot)  # noqa
  g8 = jax.jit(jax.grad(loss(sharded), argnums=(0, 1)))(jnp.asarray(x), weights)
  g1 = jax.grad(loss(single), argnums=(0, 1))(jnp.asarray(x), weights)
  for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_refused_on_cpu_before_compile():
  c = tiny_config()
  c.model.moe.dispatch.name = 'ragged_all_to_all'
  with pytest.raises(ConfigError, match="model.moe.dispatch.name='ragged_all_to_all'.*ring"):
    validate(c, 8)
