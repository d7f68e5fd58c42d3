"""Model shapes, the layer schedule, and 1-device vs 8-device agreement."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from moejax.model.schedule import layer_plan
from moejax.model.transformer import Transformer

from conftest import tiny_config, train_side_by_side, trainer_on


def test_shapes_and_parameter_tree():
  c = tiny_config()
  c.model.num_layers, c.model.first_k_dense, c.model.moe_layer_freq = 6, 1, 2
  model = Transformer(ml_collections.FrozenConfigDict(c.model))
  tokens = jnp.zeros((2, 16), jnp.int32)
  variables = jax.jit(model.init)(jax.random.key(0), tokens)
  logits, aux = jax.jit(model.apply)(variables, tokens)
  assert logits.shape == (2, 16, c.model.vocab_size) and logits.dtype == jnp.float32
  # layers: 0 dense | 1 MoE, 2 dense | 3 MoE, 4 dense | 5 MoE (tail) -> 3 MoE layers
  assert layer_plan(c.model) == (1, 2, 1)
  assert aux['expert_load'].shape == (3, 8)
  np.testing.assert_allclose(aux['expert_load'].sum(-1), 1.0, rtol=1e-6)
  p = nn.unbox(variables)['params']
  assert p['moe_layers']['moe_block']['moe']['experts']['wi_0'].shape == (2, 8, 32, 16)
  assert p['moe_layers']['dense_block_0']['ffn']['wi_0'].shape == (2, 32, 64)
  assert p['dense_layers']['block']['attn']['wk'].shape == (1, 32, 2, 8)
  # Parameters carry logical axis names, with the scan's 'layers' axis first.
  boxed = variables['params']['moe_layers']['moe_block']['moe']['experts']['wi_0']
  assert boxed.names == ('layers', 'expert', 'embed', 'expert_mlp')


def test_causality():
  """Changing a future token must not change earlier logits (dropless routing is per token)."""
  c = tiny_config()
  model = Transformer(ml_collections.FrozenConfigDict(c.model))
  a = jax.random.randint(jax.random.key(1), (1, 16), 0, 256)
  b = a.at[0, 10].set((a[0, 10] + 1) % 256)
  v = jax.jit(model.init)(jax.random.key(0), a)
  apply = jax.jit(model.apply)
  la, lb = apply(v, a)[0], apply(v, b)[0]
  np.testing.assert_allclose(la[0, :10], lb[0, :10], rtol=1e-6, atol=1e-6)
  assert not np.allclose(la[0, 10:], lb[0, 10:])


@pytest.mark.parametrize('dispatch,mesh,deepseek_v3', [
    ('dropless', dict(data=2, fsdp=1, expert=4, tensor=1), True),
    ('capacity', dict(data=1, fsdp=2, expert=2, tensor=2), False),
    pytest.param('einsum', dict(data=1, fsdp=1, expert=8, tensor=1), False,
                 marks=pytest.mark.slow),  # einsum on expert=8: test_expert_parallel.py too
])
def test_eight_devices_match_one_device(dispatch, mesh, deepseek_v3):
  """Same params and batch on 1 device and on 8 simulated devices: same losses and routing.

  Tolerance 1e-5 relative: sharded matmuls sum in a different order (float32 rounding, ~1e-7
  per op) and two optimizer steps amplify that a little; a sharding bug gives O(1) differences.
  The DeepSeek-V3 case (sigmoid, group-limited, loss-free bias, sequence-wise loss) also checks
  that the bias update uses global counts: its bias must be identical on both meshes.
  """
  c = tiny_config()
  c.model.moe.dispatch.name = dispatch
  if dispatch == 'einsum':
    c.model.moe.dispatch.group_size = 32
  if deepseek_v3:
    r, b = c.model.moe.router, c.model.moe.balance
    r.score_fn, r.routed_scaling_factor, r.num_groups, r.topk_groups = 'sigmoid', 2.5, 4, 2
    b.bias_update_rate, b.seq_aux_loss_weight = 1e-3, 1e-4
  one = trainer_on(c.copy_and_resolve_references(), dict(data=1, fsdp=1, expert=1, tensor=1))
  eight = trainer_on(c.copy_and_resolve_references(), mesh)
  state1, state8, _, _ = train_side_by_side(
      one, eight, ('train/loss', 'train/ce_loss', 'moe/aux_loss', 'moe/z_loss',
                   'train/grad_norm', 'moe/expert_load', 'moe/dropped_fraction'))
  # The expert weights really are split over the expert axis.
  wi = state8.params['moe_layers']['moe_block']['moe']['experts']['wi_0']
  assert wi.sharding.shard_shape(wi.shape)[1] == 8 // mesh['expert']
  for a, b in zip(jax.tree.leaves(state1.model_state), jax.tree.leaves(state8.model_state)):
    np.testing.assert_array_equal(a, b)
  if deepseek_v3:
    assert np.abs(jax.tree.leaves(state8.model_state)[0]).max() > 0


def test_replay_recorded_routing():
  """A recorded routing (aux['expert_index']) replays exactly, even after the router changed."""
  c = tiny_config()
  model = Transformer(ml_collections.FrozenConfigDict(c.model))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
  v = jax.jit(model.init)(jax.random.key(0), tokens)
  apply = jax.jit(model.apply)
  logits, aux = apply(v, tokens)
  recorded = aux['expert_index']  # [moe layers, T, K]
  assert recorded.shape == (2, 32, 2)
  np.testing.assert_array_equal(apply(v, tokens, None, recorded)[0], logits)
  # Scramble the routers: free routing changes, replayed routing does not.
  v2 = jax.tree_util.tree_map_with_path(
      lambda p, x: -x if any(getattr(k, 'key', None) == 'router' for k in p) else x, v)
  _, free = apply(v2, tokens)
  _, replayed = apply(v2, tokens, None, recorded)
  assert not np.array_equal(free['expert_index'], recorded)
  np.testing.assert_array_equal(replayed['expert_index'], recorded)
