"""The scope of the Switch balance loss (balance.aux_loss_scope): the global batch, each
data-parallel rank's micro-batch, or each sequence (arXiv:2501.11873), by hand."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.checks import validate
from moejax.errors import ConfigError
from moejax.moe import losses
from moejax.moe.types import RouterOutput

from conftest import tiny_config


def _routing():
  """2 sequences of 2 tokens, 2 experts, top-1. Sequence 1 prefers expert 0 (p = .8, .2) and
  goes there; sequence 2 the mirror image. Globally: f = (.5, .5), P = (.5, .5), loss
  2 (.25 + .25) = 1. Per sequence: f = (1, 0), P = (.8, .2): 2 x .8 = 1.6 each, mean 1.6."""
  probs = jnp.array([[.8, .2], [.8, .2], [.2, .8], [.2, .8]])
  index = jnp.array([[0], [0], [1], [1]], jnp.int32)
  return RouterOutput(index, jnp.ones((4, 1)), probs, jnp.log(probs))


def test_scopes_hand_worked():
  r = _routing()
  assert float(losses.switch_aux_loss(r, 2)) == pytest.approx(1.0)
  assert float(losses.switch_aux_loss(r, 2, groups=2)) == pytest.approx(1.6)
  assert float(losses.switch_aux_loss(r, 2, groups=4)) == pytest.approx(1.6)  # per token


def test_scope_gradients_flow_through_p_only():
  """d/dP of N * mean_g sum_i f_gi P_gi: sequence scope, token of sequence 1 -> f_g / 2 * N."""
  r = _routing()
  g = jax.grad(lambda p: losses.switch_aux_loss(r.replace(probs=p), 2, groups=2))(r.probs)
  np.testing.assert_allclose(g, [[.5, 0], [.5, 0], [0, .5], [0, .5]], atol=1e-7)


def test_micro_batch_is_the_data_parallel_ranks():
  assert losses.scope_groups('micro_batch', 8) == 1  # outside a mesh
  assert losses.scope_groups('sequence', 8) == 8 and losses.scope_groups('global', 8) == 1
  mesh = jax.make_mesh((2, 1, 2, 2), ('data', 'fsdp', 'expert', 'tensor'))
  with jax.set_mesh(mesh):
    assert losses.scope_groups('micro_batch', 8) == 4  # data x fsdp x expert, not tensor


def test_scope_is_checked_and_belongs_to_token_choice():
  c = tiny_config()
  c.model.moe.balance.aux_loss_scope = 'sequence'
  validate(c, 1)
  c.model.moe.balance.aux_loss_scope = 'batch'
  with pytest.raises(ConfigError, match='aux_loss_scope'):
    validate(c, 1)
  c.model.moe.balance.aux_loss_scope = 'sequence'
  c.model.moe.router.name = 'expert_choice'
  with pytest.raises(ConfigError, match="aux_loss_scope='sequence': is not read by the "
                                        "'expert_choice' router"):
    validate(c, 1)
