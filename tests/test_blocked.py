"""The fused dropless kernel of the 'blocked' backend (moe/blocked.py): outputs against the
loop-over-experts reference and gradients (tokens, gates, weights) against autodiff of an
independent dense formulation, with block sizes that split groups, leave experts empty, and
with a slice of the experts only (expert parallelism's local experts)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.kernels.blocked import auto_block, fused_dropless

from test_dispatch import loop_reference


def _problem(t=10, n=6, k=3, d=5, f=4, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(t, d)).astype(np.float32)
  # Expert 5 is never chosen: an empty group.
  index = np.stack([rng.choice(n - 1, k, replace=False) for _ in range(t)]).astype(np.int32)
  gates = rng.random((t, k)).astype(np.float32)
  w = tuple(rng.normal(size=s).astype(np.float32) / 2 for s in ((n, d, f), (n, d, f), (n, f, d)))
  return x, index, gates, w


def _dense(x, index, gates, w, first, num_local):
  """Every local expert on every token, weighted by the token's gate for it (0 if not chosen)."""
  gate = jnp.zeros((x.shape[0], num_local), x.dtype)
  local = index - first
  ok = (local >= 0) & (local < num_local)
  gate = gate.at[jnp.arange(x.shape[0])[:, None], jnp.where(ok, local, 0)].add(
      jnp.where(ok, gates, 0))
  h = jax.nn.silu(jnp.einsum('td,edf->tef', x, w[0])) * jnp.einsum('td,edf->tef', x, w[1])
  return jnp.einsum('tef,efd,te->td', h, w[2], gate)


@pytest.mark.accelerator
@pytest.mark.parametrize('block', [1, 3, 4, 64])
@pytest.mark.parametrize('first,num_local', [(0, 6), (2, 3)])
def test_fused_matches_loop_reference(block, first, num_local):
  x, index, gates, w = _problem()
  local = [a[first:first + num_local] for a in w]
  y = fused_dropless(jnp.asarray(x), jnp.asarray(index), jnp.asarray(gates), num_local, first,
                     *map(jnp.asarray, local), block)
  keep = (index >= first) & (index < first + num_local)
  ref = loop_reference(x, np.where(keep, index - first, 0), gates,
                       dict(zip(('wi_0', 'wi_1', 'wo'), local)), keep)
  np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-6)


@pytest.mark.accelerator
@pytest.mark.parametrize('block,first,num_local', [(3, 0, 6), (2, 2, 3)])
def test_fused_gradients_match_dense_autodiff(block, first, num_local):
  x, index, gates, w = _problem()
  local = tuple(jnp.asarray(a[first:first + num_local]) for a in w)
  cot = jnp.asarray(np.random.default_rng(2).normal(size=x.shape).astype(np.float32))

  def loss(fn):
    return lambda x, g, w0, w1, wo: jnp.sum(fn(x, g, (w0, w1, wo)) * cot)

  fused = lambda x, g, ws: fused_dropless(x, jnp.asarray(index), g, num_local, first, *ws,  # noqa
                                          block)
  dense = lambda x, g, ws: _dense(x, jnp.asarray(index), g, ws, first, num_local)  # noqa
  args = (jnp.asarray(x), jnp.asarray(gates)) + local
  got = jax.grad(loss(fused), argnums=range(5))(*args)
  want = jax.grad(loss(dense), argnums=range(5))(*args)
  for name, a, b in zip(('x', 'gates', 'wi_0', 'wi_1', 'wo'), got, want):
    assert np.abs(np.asarray(b)).max() > 0, name  # every gradient is exercised
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize('rows,experts,width,want', [
    (49152, 8, 512, 128), (49152, 256, 128, 256), (49152, 384, 128, 128), (8192, 16, 128, 512),
    (8192, 16, 100, 512), (8192, 16, 7168, 16), (96, 8, 32, 16), (3, 8, 32, 16)])
def test_auto_block_hand_worked(rows, experts, width, want):
  """Mean rows per expert rounded up to a power of two (6144 -> 8192, 192 -> 256, 128 -> 128,
  512 -> 512, 12 -> 16), capped at the power of two <= 65536 / width (512: 128; 128: 512;
  100: 655 -> 512; 7168: 9 -> 8), at least 16."""
  assert auto_block(rows, experts, width) == want


def test_auto_block_output_equals_explicit_block():
  x, index, gates, w = _problem()
  args = (jnp.asarray(x), jnp.asarray(index), jnp.asarray(gates), 6, 0) + tuple(map(jnp.asarray, w))
  np.testing.assert_allclose(fused_dropless(*args, 0), fused_dropless(*args, 16), rtol=1e-6)
