"""Every router trains inside the model, through the jitted sharded train step."""
import jax
import numpy as np
import pytest

from moejax.checks import validate
from moejax.parallel.mesh import make_mesh
from moejax.training.step import Trainer

from conftest import tiny_config

SETUPS = {
    'switch_top1_capacity_jitter': dict(k=1, router=dict(norm_topk_prob=False, jitter=0.01),
                                        dispatch='capacity'),
    'deepseek_v3_frozen_router': dict(router=dict(score_fn='sigmoid', routed_scaling_factor=2.5,
                                                  num_groups=4, topk_groups=2, freeze=True),
                                      balance=dict(bias_update_rate=1e-3,
                                                   seq_aux_loss_weight=1e-4, aux_loss_weight=0.0)),
    'noisy_topk_importance': dict(router=dict(name='noisy_topk'),
                                  balance=dict(importance_loss_weight=1e-2,
                                               load_loss_weight=1e-2)),
    'sinkhorn_device_comm_losses': dict(router=dict(name='sinkhorn'),
                                        balance=dict(device_loss_weight=1e-2, num_devices=2,
                                                     comm_loss_weight=1e-2)),
    'expert_choice_sequence': dict(router=dict(name='expert_choice', ec_scope='sequence')),
    'hash_balanced': dict(router=dict(name='hash', hash_kind='balanced'),
                          balance=dict(aux_loss_weight=0.0, z_loss_weight=0.0)),
}


def _router_w(state):
  return np.asarray(state.params['moe_layers']['moe_block']['moe']['router']['w'])


@pytest.mark.parametrize('name', list(SETUPS))
def test_router_trains(name):
  s = SETUPS[name]
  c = tiny_config()
  moe = c.model.moe
  moe.num_experts_per_tok = s.get('k', 2)
  moe.dispatch.name = s.get('dispatch', 'dropless')
  for k, v in s.get('router', {}).items():
    moe.router[k] = v
  for k, v in s.get('balance', {}).items():
    moe.balance[k] = v
  c.mesh.data = 1
  trainer = Trainer(c, make_mesh(validate(c, 1), jax.devices()[:1]))
  state = trainer.init(0)
  before = jax.device_get(state)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(3):
    tokens = rng.integers(0, 256, (8, 17)).astype(np.int32)
    state, m = trainer.train_step(state, {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]})
    losses.append(float(m['train/loss']))
  assert np.isfinite(losses).all()
  if name == 'expert_choice_sequence':  # the one whose evaluation routes differently
    ev = jax.device_get(trainer.eval_step(state, {'inputs': tokens[:, :-1],
                                                  'targets': tokens[:, 1:]}))
    assert np.isfinite(ev['eval/loss'])
  if name != 'hash_balanced':
    frozen = moe.router.freeze
    assert np.array_equal(_router_w(before), _router_w(state)) == frozen
  if moe.balance.bias_update_rate:
    bias = jax.tree.leaves(state.model_state)[0]
    assert np.abs(np.asarray(bias)).max() > 0
