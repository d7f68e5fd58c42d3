"""Each MoE piece owns its contract: the fields it reads, its checks and its causality. The
registry derives the MoE part of validation from them, so a field set away from its default
that the chosen router or dispatcher does not read is refused, naming the piece."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from moejax.checks import validate
from moejax.config import base_config
from moejax.errors import ConfigError
from moejax.model.schedule import routing_is_causal
from moejax.moe import losses, registry
from moejax.moe.dispatch.capacity import TokenDropping
from moejax.moe.layer import MoEFFN
from moejax.moe.routers.base import LearnedRouter
from moejax.moe.types import RouterOutput

from conftest import tiny_config


def _config(**fields):
  c = tiny_config()
  for dotted, value in fields.items():
    node = c.model.moe
    *path, last = dotted.split('__')
    for p in path:
      node = node[p]
    node[last] = value
  return c


@pytest.mark.parametrize('fields,field,piece', [
    ({'router__name': 'sinkhorn', 'router__score_fn': 'sigmoid'}, 'router.score_fn',
     "'sinkhorn' router"),
    ({'router__name': 'hash', 'router__num_groups': 2}, 'router.num_groups', "'hash' router"),
    ({'router__name': 'hash', 'router__jitter': 0.1}, 'router.jitter', "'hash' router"),
    ({'router__name': 'noisy_topk', 'router__routed_scaling_factor': 2.5},
     'router.routed_scaling_factor', "'noisy_topk' router"),
    ({'router__name': 'expert_choice', 'num_experts_per_tok': 4}, 'num_experts_per_tok',
     "'expert_choice' router"),
    ({'router__name': 'expert_choice', 'balance__aux_loss_weight': 0.1},
     'balance.aux_loss_weight', "'expert_choice' router"),
    ({'router__name': 'expert_choice', 'router__ec_eval': 'expert_choice',
      'experts__block_size': 0, 'dispatch__name': 'capacity'}, 'dispatch.name',
     "'expert_choice' router"),
    ({'router__name': 'topk', 'router__sinkhorn_iters': 3}, 'router.sinkhorn_iters',
     "'topk' router"),
    ({'dispatch__name': 'dropless', 'dispatch__capacity_factor': 2.0},
     'dispatch.capacity_factor', "'dropless' dispatcher"),
    ({'dispatch__name': 'capacity', 'experts__block_size': 64}, 'experts.block_size',
     "'capacity' dispatcher"),
    ({'dispatch__name': 'capacity', 'dispatch__group_size': 16}, 'dispatch.group_size',
     "'capacity' dispatcher"),
])
def test_a_setting_the_chosen_pieces_ignore_is_refused(fields, field, piece):
  with pytest.raises(ConfigError) as e:
    validate(_config(**fields), 1)
  message = str(e.value)
  assert message.startswith(f'config.model.moe.{field}=') and piece in message, message
  assert 'remove the setting' in message


def test_the_message_names_the_pieces_that_read_it():
  with pytest.raises(ConfigError, match=r'choose a dispatcher that reads it \(einsum\)'):
    validate(_config(dispatch__name='capacity', dispatch__group_size=16), 1)


@pytest.mark.parametrize('fields', [
    {'router__name': 'expert_choice', 'balance__aux_loss_weight': 0.0},  # 0: the loss is off
    {'router__name': 'hash', 'balance__bias_update_rate': 0.0},
    {'router__name': 'expert_choice', 'dispatch__name': 'capacity',  # eval: top-K dispatch
     'dispatch__capacity_factor': 3.0},
    {'router__name': 'sinkhorn', 'router__norm_topk_prob': False},
    {'dispatch__name': 'einsum', 'dispatch__group_size': 16, 'dispatch__priority': 'position'},
    {'dispatch__name': 'ring', 'experts__block_size': 16},
])
def test_settings_a_chosen_piece_reads_are_accepted(fields):
  validate(_config(**fields), 1)


def test_expert_choice_dispatch_is_the_routers_own():
  with pytest.raises(ConfigError, match=r"dispatch.name='expert_choice': is chosen by router"):
    validate(_config(dispatch__name='expert_choice'), 1)
  with pytest.raises(ConfigError, match=r"dispatch.name='expert_choice': is chosen by router"):
    validate(_config(router__name='expert_choice', dispatch__name='expert_choice'), 1)


def test_unknown_names_list_the_registry():
  with pytest.raises(ConfigError, match=r"router.name='nope': must be one of \["
                     r"'expert_choice', 'expert_threshold', 'grouped_topk', 'hash', 'noisy_topk', "
                     r"'relu', 'sinkhorn', 'sparsemixer', 'top_p', 'topk'\]"):
    validate(_config(router__name='nope'), 1)
  with pytest.raises(ConfigError, match=r"dispatch.name='nope': must be one of \['all_to_all', "
                     r"'auto', 'capacity'"):
    validate(_config(dispatch__name='nope'), 1)


@pytest.mark.parametrize('router,dispatch,priority,k,train,causal', [
    ('topk', 'dropless', 'choice', 2, True, True),
    ('topk', 'capacity', 'choice', 2, True, False),
    ('topk', 'capacity', 'choice', 1, True, True),
    ('topk', 'capacity', 'position', 2, True, True),
    ('topk', 'einsum', 'probability', 1, False, False),
    ('sinkhorn', 'dropless', 'choice', 2, True, False),
    ('sinkhorn', 'dropless', 'choice', 2, False, True),
    ('expert_choice', 'capacity', 'choice', 2, False, False),  # eval top-K through capacity
    ('expert_choice', 'dropless', 'choice', 2, False, True),
    ('expert_choice', 'dropless', 'choice', 2, True, False),
])
def test_causality_combines_router_and_dispatcher(router, dispatch, priority, k, train, causal):
  m = tiny_config().model
  m.moe.router.name, m.moe.dispatch.name = router, dispatch
  m.moe.dispatch.priority, m.moe.num_experts_per_tok = priority, k
  assert routing_is_causal(m, train) is causal


class FirstExperts(LearnedRouter):
  """A router written against the contract alone: token t goes to experts t mod N .. + K - 1
  with equal weights (its logits only feed the z-loss); one setting of its own, `offset`."""
  offset: int = 0

  @nn.compact
  def __call__(self, x, token_ids=None, batch=1, train=True, bias=None, state=None,
               replay=None, layer=None):
    t = x.shape[0]
    logits = self.logits(x, self.num_experts, train)
    first = (jnp.arange(t)[:, None] + self.offset) % self.num_experts
    index = ((first + jnp.arange(self.k)) % self.num_experts).astype(jnp.int32)  # [T, K]
    return RouterOutput(index, jnp.full((t, self.k), 1.0 / self.k), jax.nn.softmax(logits),
                        logits)


def test_a_router_is_one_class_and_one_registry_line(monkeypatch):
  """What a router reads is derived from the class: its settings (dataclass fields) under
  router.*, the logits' settings it inherits, K, and the general balance losses."""
  monkeypatch.setitem(registry.ROUTERS, 'first', FirstExperts)
  assert set(FirstExperts.reads()) == {
      'router.dtype', 'router.jitter', 'router.freeze', 'router.logit_bias', 'router.offset',
      'num_experts_per_tok', 'balance.simbal_loss_weight', *losses.general_fields()}
  assert base_config().model.moe.router.offset == 0  # its setting joined the schema
  c = _config(router__name='first', router__offset=3)
  validate(c, 1)
  with pytest.raises(ConfigError, match="not read by the 'first' router"):
    validate(_config(router__name='first', router__score_fn='sigmoid'), 1)
  with pytest.raises(ConfigError, match="not read by the 'first' router"):  # no selection bias
    validate(_config(router__name='first', balance__bias_update_rate=1e-3), 1)
  layer = MoEFFN(ml_collections.FrozenConfigDict(c.model.moe), c.model.d_model)
  x = jax.random.normal(jax.random.key(0), (2, 4, c.model.d_model))
  params = layer.init(jax.random.key(1), x)
  _, aux = layer.apply(params, x)
  assert aux['expert_index'][:, 0].tolist() == [3, 4, 5, 6, 7, 0, 1, 2]


def test_pieces_are_built_from_their_config_sections():
  """The constructor is the schema: the dataclass fields are the config fields."""
  c = _config(dispatch__name='einsum', dispatch__group_size=16, dispatch__priority='position')
  d = registry.make_dispatcher(ml_collections.FrozenConfigDict(c.model.moe))
  assert d.group_size == 16 and d.priority == 'position'
  for cls in registry.DISPATCHERS.values():
    for f in cls.reads():  # every declared field exists in the schema
      section, name = f.split('.')
      assert name in c.model.moe[section], (cls, f)
  for cls in registry.ROUTERS.values():
    for f in cls.reads():
      node = c.model.moe
      for part in f.split('.'):
        assert part in node, (cls, f)
        node = node[part]
  assert issubclass(registry.DISPATCHERS['capacity'], TokenDropping)
  assert {f.name for f in dataclasses.fields(registry.DISPATCHERS['dropless'])} == set()
  c.model.moe.experts.block_size = 24
  experts = registry.make_experts(ml_collections.FrozenConfigDict(c.model.moe), 32, jnp.float32)
  assert (experts.block_size, experts.backend, experts.d_ff) == (24, 'auto', 16)
  for cls in registry.EXPERTS.values():  # an expert block's own fields are in its section
    assert all(f.split('.')[1] in c.model.moe.experts for f in getattr(cls, 'READS', ())), cls
  with pytest.raises(ConfigError, match=r"experts.name='gelu': must be one of \['glu', 'mlp', 'swiglu'\]"):
    validate(_config(experts__name='gelu'), 1)


def test_readme_override_of_the_quickstart_validates():
  """README's example: the quickstart with capacity dispatch (no dropless-only setting left)."""
  from moejax import cli
  c = cli.load_config('quickstart')
  cli.apply_overrides(c, [('model.moe.dispatch.name', 'capacity'),
                          ('model.moe.dispatch.capacity_factor', '1.0')])
  validate(c, 1)


@pytest.mark.parametrize('dispatch,scopes', [
    ('capacity', {'route', 'dispatch', 'experts', 'combine', 'balance'}),
    ('dropless', {'route', 'dispatch', 'experts', 'balance'})])
def test_profiles_read_by_stage(dispatch, scopes):
  """jax.named_scope on route, dispatch, experts, combine and balance reaches the lowered
  program's locations, which is what profilers show."""
  import re
  c = _config(dispatch__name=dispatch)
  layer = MoEFFN(ml_collections.FrozenConfigDict(c.model.moe), c.model.d_model)
  x = jax.random.normal(jax.random.key(0), (2, 8, c.model.d_model))
  params = layer.init(jax.random.key(1), x)
  text = jax.jit(lambda p, x: jax.tree.leaves(layer.apply(p, x))).lower(params, x).as_text(
      debug_info=True)
  assert scopes <= set(re.findall(r'(route|dispatch|experts|combine|balance)/', text))


def test_the_bias_update_is_returned_and_applied_by_the_train_step():
  """Balance in one room: the forward pass leaves the selection bias as it is and returns its
  update (collection 'bias_updates', the sign rule on the global counts); the train step
  adds it; eval returns none. An existing bias with updates off is used and stays fixed."""
  from moejax.moe import balance, losses
  c = _config(balance__bias_update_rate=1e-2)
  layer = MoEFFN(ml_collections.FrozenConfigDict(c.model.moe), c.model.d_model)
  x = jax.random.normal(jax.random.key(0), (2, 8, c.model.d_model))
  v = layer.init(jax.random.key(1), x)
  assert 'bias_updates' not in v
  (_, aux), upd = layer.apply(v, x, train=True, mutable=['bias_updates'])
  counts = losses.expert_counts(aux['expert_index'], c.model.moe.num_experts)
  want = 1e-2 * jnp.sign(jnp.mean(counts) - counts)
  assert jnp.array_equal(upd['bias_updates']['bias'], want) and jnp.any(want != 0)
  (_, _), upd_eval = layer.apply(v, x, train=False, mutable=['bias_updates'])
  assert not upd_eval
  new = balance.apply_bias_updates({k: v[k] for k in v if k != 'params'}, upd)
  assert jnp.array_equal(new['moe_state']['bias'], v['moe_state']['bias'] + want)
  # Updates off, bias present (e.g. imported): selection uses it, nothing is returned.
  fixed = _config()
  layer0 = MoEFFN(ml_collections.FrozenConfigDict(fixed.model.moe), fixed.model.d_model)
  v0 = {'params': v['params'], 'moe_state': {'bias': jnp.zeros(8).at[3].set(10.0)}}
  (_, aux0), upd0 = layer0.apply(v0, x, train=True, mutable=['bias_updates'])
  assert not upd0 and bool(jnp.all(jnp.any(aux0['expert_index'] == 3, axis=-1)))


def test_a_loss_is_one_row_and_its_function(monkeypatch):
  """A balance loss added as one table row: its weight joins the schema, validation, the
  layer's weighted sum, the logged metrics and the final line; off (weight 0) it is not
  computed at all."""
  row = losses.Loss('peak_loss', 'peak_loss_weight',
                    lambda r, moe, b: jnp.mean(jnp.max(r.probs, axis=-1)))  # mean top prob
  monkeypatch.setattr(losses, 'LOSSES', losses.LOSSES + (row,))
  monkeypatch.setitem(losses.BY_NAME, 'peak_loss', row)
  assert base_config().model.moe.balance.peak_loss_weight == 0.0
  with pytest.raises(ConfigError, match=r'balance.peak_loss_weight=-1.0: must be >= 0'):
    validate(_config(balance__peak_loss_weight=-1.0), 1)
  with pytest.raises(ConfigError, match="peak_loss_weight.*not read by the 'expert_choice'"):
    validate(_config(router__name='expert_choice', balance__peak_loss_weight=0.5), 1)
  c = _config(balance__peak_loss_weight=0.5)
  validate(c, 1)
  x = jax.random.normal(jax.random.key(0), (2, 8, c.model.d_model))

  def run(cfg):
    layer = MoEFFN(ml_collections.FrozenConfigDict(cfg.model.moe), cfg.model.d_model)
    params = layer.init(jax.random.key(1), x)
    return layer.apply(params, x)[1]
  aux = run(c)
  b = c.model.moe.balance
  want = b.aux_loss_weight * aux['aux_loss'] + b.z_loss_weight * aux['z_loss'] + (
      0.5 * aux['peak_loss'])
  np.testing.assert_allclose(aux['loss'], want, rtol=1e-6)
  assert 0.125 <= float(aux['peak_loss']) <= 1.0  # a top probability of 8 experts
  assert 'peak_loss' not in run(_config())  # weight 0: not computed
  from moejax.training.loop import summary_line
  from moejax.training.step import moe_metrics
  stacked = jax.tree.map(lambda a: a[None], aux)
  metrics = moe_metrics(stacked)
  assert float(metrics['moe/peak_loss']) == pytest.approx(float(aux['peak_loss']))
  assert 'moe/peak_loss 0.' in summary_line({'step': 1, **jax.device_get(metrics)}, c)


def test_a_loss_off_is_not_computed_but_the_monitors_always_are():
  """Weight 0: the Switch loss (a monitor) is still computed and logged, the sequence-wise
  loss is not; with its weight on, it is."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 32))

  def aux_of(**fields):
    c = _config(**fields)
    layer = MoEFFN(ml_collections.FrozenConfigDict(c.model.moe), c.model.d_model)
    return layer.apply(layer.init(jax.random.key(1), x), x)[1]
  off = aux_of(balance__aux_loss_weight=0.0)
  assert 'aux_loss' in off and 'z_loss' in off and 'seq_aux_loss' not in off
  assert float(off['aux_loss']) > 0.9  # the real value, about 1 near uniform routing
  assert 'seq_aux_loss' in aux_of(balance__seq_aux_loss_weight=1e-2)


def test_the_l1_penalty_is_weighted_by_the_layers_adaptive_coefficient():
  """ReLU routing: the layer's loss is the config's weights times their losses plus the
  coefficient in the layer state (not balance.l1_target) times the L1 penalty."""
  c = _config(router__name='relu', balance__l1_target=2.0, balance__l1_init=0.25,
              balance__aux_loss_weight=0.0)
  layer = MoEFFN(ml_collections.FrozenConfigDict(c.model.moe), c.model.d_model)
  x = jax.random.normal(jax.random.key(0), (2, 8, 32))
  v = layer.init(jax.random.key(1), x)
  assert float(v['moe_state']['l1_coef']) == 0.25
  _, aux = layer.apply(v, x)
  want = c.model.moe.balance.z_loss_weight * aux['z_loss'] + 0.25 * aux['l1_loss']
  np.testing.assert_allclose(aux['loss'], want, rtol=1e-6)
  assert float(aux['l1_loss']) > 0

