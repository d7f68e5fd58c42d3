"""The ring of experts (dispatch 'ring'): dropless expert parallelism with all_gather and
psum_scatter. Its per-device piece is checked against the loop-over-experts reference, and the
whole path on 8 simulated devices against the dropless path on 1."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import base_config
from moejax.kernels.grouped import dropless_swiglu, grouped_swiglu
from moejax.costs.planner import all_to_all, parse_mesh

from conftest import tiny_config, train_side_by_side, trainer_on
from test_dispatch import TOKAMAX, loop_reference

ONE = dict(data=1, fsdp=1, expert=1, tensor=1)


def _problem(t=12, n=8, k=2, d=6, f=5, seed=0, nulls=False):
  """nulls: some slots null (index n, a gate that must not be used): a third of the tokens
  have one expert, a fifth none."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(t, d)).astype(np.float32)
  index = np.stack([rng.choice(n, k, replace=False) for _ in range(t)]).astype(np.int32)
  gates = rng.random((t, k)).astype(np.float32)
  if nulls:
    index[::3, -1] = n
    index[::5] = n
  w = {'wi_0': rng.normal(size=(n, d, f)).astype(np.float32) / 3,
       'wi_1': rng.normal(size=(n, d, f)).astype(np.float32) / 3,
       'wo': rng.normal(size=(n, f, d)).astype(np.float32) / 3}
  return x, index, gates, w


@pytest.mark.accelerator
@pytest.mark.parametrize('backend', ['blocked', 'ragged_dot',
                                     pytest.param('tokamax', marks=TOKAMAX)])
@pytest.mark.parametrize('ranks,nulls', [(1, False), (2, False), (4, False), (4, True)])
def test_expert_ranks_sum_to_the_loop_reference(backend, ranks, nulls):
  """Each rank computes only the choices of its N / EP experts; the sum over ranks (what the
  psum_scatter adds up) equals the loop-over-experts reference of all of them. Null slots
  (index N) belong to no rank."""
  x, index, gates, w = _problem(nulls=nulls)
  n = 8
  per = n // ranks
  total = 0
  for rank in range(ranks):
    sl = slice(rank * per, (rank + 1) * per)
    mine = [jnp.asarray(w[name][sl]) for name in ('wi_0', 'wi_1', 'wo')]
    total = total + dropless_swiglu(jnp.asarray(x), jnp.asarray(index), jnp.asarray(gates),
                                    per, rank * per, mine, backend, 4)
  np.testing.assert_allclose(total, loop_reference(x, index, gates, w), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize('backend', ['blocked', 'ragged_dot',
                                     pytest.param('tokamax', marks=TOKAMAX)])
def test_rows_past_the_groups_are_zero(backend):
  """Groups (2, 1) over 6 rows: rows 0-2 are computed, rows 3-5 (parked) are exactly zero."""
  x, _, _, w = _problem(n=2)
  y = grouped_swiglu(jnp.asarray(x[:6]), jnp.array([2, 1], jnp.int32),
                     *(jnp.asarray(w[k]) for k in ('wi_0', 'wi_1', 'wo')), backend=backend,
                     block_size=2)
  assert np.all(np.asarray(y[3:]) == 0) and np.all(np.abs(np.asarray(y[:3])) > 0)
  ref = loop_reference(x[:3], np.array([[0], [0], [1]]), np.ones((3, 1)), w)
  np.testing.assert_allclose(y[:3], ref, rtol=2e-5, atol=2e-6)


def test_planner_ring_bytes_hand_worked():
  """d_model 32, K 2, bf16, EP 8, ring: (8 - 1) (2 * 32 * 2 + 8 * 2) = 7 * 144 = 1008 bytes per
  token and layer; 100 tokens per device: 100800. EP 1: nothing moves."""
  m = base_config().model
  m.d_model, m.moe.num_experts, m.moe.num_experts_per_tok = 32, 8, 2
  out = all_to_all(m, parse_mesh('expert=8'), 100, 'bf16')
  assert out['ring_bytes_per_token_per_layer'] == 1008
  assert out['ring_bytes_per_device_per_layer'] == 100800
  # Exact-size exchange: K = 2 pairs out and back, 7/8 of them remote: 2 * 2 * 7/8 * 32 * 2.
  assert out['ragged_bytes_per_token_per_layer'] == 224
  assert all_to_all(m, parse_mesh('data=8'), 100, 'bf16')['ring_bytes_per_token_per_layer'] == 0


@pytest.mark.accelerator
@pytest.mark.parametrize('mesh', [
    pytest.param(dict(data=1, fsdp=1, expert=8, tensor=1), marks=pytest.mark.slow),
    dict(data=2, fsdp=1, expert=4, tensor=1)])
def test_ring_on_8_devices_equals_dropless_on_1(mesh):
  """Two training steps: losses, gradient norms, loss-free biases and updated parameters equal
  the dropless path on one device; nothing is dropped. Tolerance 1e-5 relative (summation
  order of sharded programs); a routing or combine bug gives O(1) differences."""
  c = tiny_config()
  c.model.moe.balance.bias_update_rate = 1e-2
  ref = c.copy_and_resolve_references()
  c.model.moe.dispatch.name = 'ring'
  state1, state8, _, m8 = train_side_by_side(
      trainer_on(ref, ONE), trainer_on(c, mesh),
      ('train/loss', 'train/ce_loss', 'train/grad_norm', 'moe/aux_loss'), atol=0)
  assert m8['moe/dropped_fraction'] == 0
  for a, b in zip(jax.tree.leaves(jax.device_get(state1)), jax.tree.leaves(
      jax.device_get(state8))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
