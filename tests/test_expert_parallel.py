"""The shard_map all-to-all dispatch on 8 simulated devices against 1 device.

Its capacity is per device, so with drops it must equal the einsum path with one group per
device (group_size = tokens / devices) run on 1 device; without drops, the dropless path.
Tolerance 1e-5 relative: sharded and unsharded programs sum in different orders (float32).
The mesh mixes data parallelism and expert parallelism (data=2, expert=4); the same check on
(expert=8) without drops against the dropless path also passes, and is left out of the default
run for its compile time (add it to the parametrize list to run it)."""
import jax
import numpy as np
import pytest

from conftest import tiny_config, train_side_by_side, trainer_on

ONE = dict(data=1, fsdp=1, expert=1, tensor=1)


@pytest.mark.parametrize('mesh,factor,reference', [
    (dict(data=2, fsdp=1, expert=4, tensor=1), 0.5, 'einsum'),  # drops: per-device groups
])
def test_all_to_all_matches_one_device(mesh, factor, reference):
  c = tiny_config()
  d = c.model.moe.dispatch
  d.capacity_factor = d.eval_capacity_factor = factor
  d.min_capacity, d.priority = 1, 'position'
  ref = c.copy_and_resolve_references()
  ref.model.moe.dispatch.name = reference
  ref.model.moe.dispatch.group_size = 8 * 16 // 8  # batch 8 x seq 16 over 8 devices
  c.model.moe.dispatch.name = 'all_to_all'
  state1, state8, m1, m8 = train_side_by_side(
      trainer_on(ref, ONE), trainer_on(c, mesh),
      ('train/loss', 'train/grad_norm', 'moe/dropped_fraction', 'moe/aux_loss'))
  if reference == 'einsum':
    assert m8['moe/dropped_fraction'] > 0.2
  else:
    assert m8['moe/dropped_fraction'] == 0
  for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state8.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
