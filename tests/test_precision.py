"""Rematerialisation policies (model.remat) change what the backward pass keeps, never the
gradients; bfloat16 compute with float32 parameters and router tracks the float32 run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.checks import validate
from moejax.errors import ConfigError

from conftest import tiny_config, trainer_on

ONE = dict(data=1, fsdp=1, expert=1, tensor=1)


def _config(**model):
  c = tiny_config()
  c.model.num_layers, c.model.moe_layer_freq = 4, 2  # dense, (MoE, dense), tail: MoE
  for k, v in model.items():
    c.model[k] = v
  return c


def _batch():
  tokens = np.random.default_rng(0).integers(0, 256, (8, 17)).astype(np.int32)
  return {'inputs': jnp.asarray(tokens[:, :-1]), 'targets': jnp.asarray(tokens[:, 1:])}


def _grads(trainer, state, batch):
  with trainer.context():
    fn = jax.jit(jax.grad(lambda p: trainer.loss_fn(p, state.model_state, batch,
                                                    jax.random.key(0))[0]))
    return fn(state.params)


def _saved(trainer, state, batch, capsys):
  """The residuals the backward pass keeps, as jax.ad_checkpoint.print_saved_residuals lists."""
  with trainer.context():
    jax.ad_checkpoint.print_saved_residuals(
        lambda p: trainer.loss_fn(p, state.model_state, batch, jax.random.key(0))[0],
        state.params)
  return capsys.readouterr().out


_REMATS = (('full', ()), ('names', ('attn_out', 'ffn_in')))


def test_remat_policies_change_what_is_saved(capsys):
  """The residuals the backward pass keeps (traced, not compiled): fewest under full remat,
  the named ones under names, every one without."""
  batch = _batch()
  base = trainer_on(_config(), ONE)
  state = base.init(0)
  saved = {'none': _saved(base, state, batch, capsys)}
  for remat, names in _REMATS:
    saved[remat] = _saved(trainer_on(_config(remat=remat, remat_save=names), ONE), state, batch,
                          capsys)
  count = {k: len(v.splitlines()) for k, v in saved.items()}
  assert count['full'] < count['names'] < count['none'], count
  # The tail block is not scanned, so its residuals keep their names (scanned ones are listed
  # as outputs of the scan).
  assert "named 'attn_out'" in saved['names'] and "named 'ffn_in'" in saved['names']
  assert "named 'query_proj'" not in saved['names'] and 'named' not in saved['full']


@pytest.mark.slow  # three gradient programs compiled
def test_remat_policies_keep_the_gradients():
  batch = _batch()
  base = trainer_on(_config(), ONE)
  state = base.init(0)
  want = _grads(base, state, batch)
  for remat, names in _REMATS:
    got = _grads(trainer_on(_config(remat=remat, remat_save=names), ONE), state, batch)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('remat,names,field', [
    ('some', (), 'model.remat'), ('names', (), 'model.remat_save'),
    ('names', ('attn_out', 'mlp'), 'model.remat_save'), ('full', ('attn_out',), 'model.remat_save')])
def test_bad_remat_settings_name_the_field(remat, names, field):
  with pytest.raises(ConfigError, match=f'config.{field}='):
    validate(_config(remat=remat, remat_save=names), 1)

@pytest.mark.accelerator
@pytest.mark.slow  # two training programs compiled
def test_bfloat16_compute_tracks_float32():
  """20 AdamW steps on one learnable batch (a repeating pattern). bfloat16 activations
  (8 significant bits: relative rounding 2^-8) with float32 parameters, optimizer and router
  stay within 2% of the float32 losses at every step, and both learn."""
  pattern = np.tile(np.arange(16, dtype=np.int32) * 7 % 61, 3)
  rows = np.stack([np.roll(pattern, i)[:17] for i in range(8)])
  batch = {'inputs': rows[:, :-1], 'targets': rows[:, 1:]}
  losses = {}
  for dtype in ('float32', 'bfloat16'):
    c = _config(dtype=dtype)
    c.train.steps, c.train.warmup_steps, c.train.lr = 40, 2, 3e-3
    trainer = trainer_on(c, ONE)
    state = trainer.init(0)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
    out = []
    for _ in range(20):
      state, m = trainer.train_step(state, batch)
      out.append(float(m['train/loss']))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
    losses[dtype] = np.array(out)
  f32, bf16 = losses['float32'], losses['bfloat16']
  assert f32[-1] < 0.5 * f32[0], f32  # it learns the pattern
  np.testing.assert_allclose(bf16, f32, rtol=2e-2)
  assert not np.array_equal(bf16, f32)  # the bfloat16 run really computed in bfloat16


def _side_by_side(c, steps: int, batches):
  """Losses of `steps` train steps in float32 and bfloat16 from the same initial state, and
  the share of routing choices the two models make alike on the first batch afterwards: of
  the (token, layer, expert) choices, those both make (a token's K experts as a set: which of
  its top-K slots an expert lands in follows from near-tied scores and means nothing)."""
  out, routes = {}, {}
  init = None
  for dtype in ('float32', 'bfloat16'):
    c.model.dtype = dtype
    trainer = trainer_on(c, ONE)
    state = trainer.init(0) if init is None else jax.device_put(init, trainer.state_sharding)
    init = jax.device_get(state) if init is None else init
    losses = []
    for i in range(steps):
      state, m = trainer.train_step(state, batches[i % len(batches)])
      losses.append(float(m['train/loss']))
    out[dtype] = np.array(losses)
    with trainer.context():
      _, aux = trainer.eval_model.apply({'params': state.params, **state.model_state},
                                        jnp.asarray(batches[0]['inputs']))
    routes[dtype] = np.asarray(aux['expert_index'])  # [..., tokens, K]
  a, b = routes['float32'], routes['bfloat16']
  agreement = float(np.mean((a[..., :, None] == b[..., None, :]).any(-1)))
  return out['float32'], out['bfloat16'], agreement


BF16_PATHS = [('capacity', 'auto', 'swiglu'), ('einsum', 'auto', 'swiglu'),
              ('dropless', 'blocked', 'swiglu'), ('dropless', 'ragged_dot', 'swiglu'),
              ('all_to_all', 'auto', 'swiglu'), ('ring', 'blocked', 'swiglu'),
              ('capacity', 'auto', 'mlp'), ('einsum', 'auto', 'mlp'),
              ('dropless', 'blocked', 'mlp'), ('dropless', 'ragged_dot', 'mlp'),
              ('all_to_all', 'auto', 'mlp'), ('ring', 'blocked', 'mlp')]


@pytest.mark.slow
@pytest.mark.parametrize('dispatch,backend,block', BF16_PATHS)
def test_bfloat16_tracks_float32_on_every_path_and_block(dispatch, backend, block, capsys):
  """15 steps from one initial state: bfloat16 losses within 3% of float32 at every step
  (bfloat16 keeps 8 significant bits; the router, norms, softmax and loss stay float32), and
  the routing of the two trained models agrees on most choices (printed)."""
  c = _config()
  m = c.model.moe
  m.dispatch.name, m.experts.name, m.experts.backend = dispatch, block, backend
  if dispatch in ('capacity', 'einsum', 'all_to_all'):
    m.dispatch.capacity_factor = m.dispatch.eval_capacity_factor = 4.0
  if dispatch == 'einsum':
    m.dispatch.group_size = 32
  c.train.steps, c.train.warmup_steps = 40, 2
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(3):
    rows = rng.integers(0, 256, (8, 17)).astype(np.int32)
    batches.append({'inputs': rows[:, :-1], 'targets': rows[:, 1:]})
  f32, bf16, agreement = _side_by_side(c, 15, batches)
  with capsys.disabled():
    print(f'\n{dispatch}/{backend}/{block}: max loss gap {np.max(np.abs(bf16 / f32 - 1)):.4f}, '
          f'routing agreement {agreement:.3f}')
  np.testing.assert_allclose(bf16, f32, rtol=3e-2)
  assert not np.array_equal(bf16, f32) and agreement > 0.7


@pytest.mark.slow
def test_quickstart_first_50_steps_in_bfloat16(capsys):
  """The quickstart model on its own data, 50 steps: bfloat16 losses within 2% of float32's at
  every step; the routing agreement of the two trained models is printed and above 80%."""
  from moejax import cli
  from moejax.data import pipeline
  c = cli.load_config('quickstart')
  c.train.steps = 240
  splits = pipeline.load_splits(c.data, c.seed, c.model.vocab_size)
  it = iter(pipeline.train_dataset(splits.train, c.train.batch_size, c.seed))
  batches = [next(it) for _ in range(50)]
  f32, bf16, agreement = _side_by_side(c, 50, batches)
  with capsys.disabled():
    print(f'\nquickstart, 50 steps: largest loss gap {np.max(np.abs(bf16 / f32 - 1)):.4f} '
          f'(step {int(np.argmax(np.abs(bf16 / f32 - 1))) + 1}), final losses {f32[-1]:.4f} / '
          f'{bf16[-1]:.4f}, routing agreement {agreement:.3f}')
  np.testing.assert_allclose(bf16, f32, rtol=2e-2)
  assert f32[-1] < f32[0] - 1.0 and agreement > 0.8
