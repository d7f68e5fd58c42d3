"""Sparse upcycling (moejax/upcycle.py): copy mode preserves the dense model's function, slice
mode cuts the FFN as stated, bad pairs of configs are refused before anything is read."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from conftest import tiny_config
from moejax.config import ConfigError
from moejax.model.transformer import Transformer
from moejax.upcycle import check, upcycle_params


def _pair(width, k=2, shared=1, norm=True):
  dense = tiny_config()
  dense.model.first_k_dense = dense.model.num_layers  # 3 dense layers, ffn_dim 64
  moe = tiny_config(num_experts=8, num_experts_per_tok=k, expert_ffn_dim=width,
                    num_shared_experts=shared)
  moe.model.moe.router.norm_topk_prob = norm
  return dense, moe


def _init(model_cfg, tokens, seed):
  model = Transformer(ml_collections.FrozenConfigDict(model_cfg), train=False)
  return model, nn.unbox(jax.jit(model.init)(jax.random.key(seed), tokens)['params'])


def test_copy_mode_computes_the_dense_model():
  dense, moe = _pair(width=64)
  check(dense, moe, 'copy')
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  dense_model, dense_params = _init(dense.model, tokens, 1)
  moe_model, fresh = _init(moe.model, tokens, 2)
  params = upcycle_params(jax.device_get(dense_params), jax.device_get(fresh), moe.model, 'copy')
  want, _ = jax.jit(dense_model.apply)({'params': dense_params}, tokens)
  moe_apply = jax.jit(moe_model.apply)
  got, aux = moe_apply({'params': params}, tokens)
  # Renormalised top-K weights sum to 1 over identical experts; the shared expert starts silent.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(got - moe_apply({'params': fresh}, tokens)[0]).max()) > 1e-2
  # The router is the fresh one, not a copy of anything dense.
  np.testing.assert_array_equal(params['moe_layers']['moe_block']['moe']['router']['w'],
                                fresh['moe_layers']['moe_block']['moe']['router']['w'])


def test_slice_mode_cuts_the_ffn():
  dense, moe = _pair(width=16, k=4, shared=1)
  check(dense, moe, 'slice')
  tokens = jnp.zeros((1, 8), jnp.int32)
  _, dense_params = _init(dense.model, tokens, 1)
  _, fresh = _init(moe.model, tokens, 2)
  params = upcycle_params(jax.device_get(dense_params), jax.device_get(fresh), moe.model, 'slice')
  ffn = dense_params['dense_layers']['block']['ffn']
  experts = params['moe_layers']['moe_block']['moe']['experts']
  for e in range(8):  # 64 / 16 = 4 slices; expert e is slice e mod 4 of layers 1 and 2
    s = slice((e % 4) * 16, (e % 4 + 1) * 16)
    np.testing.assert_array_equal(experts['wi_0'][:, e], ffn['wi_0'][1:, :, s])
    np.testing.assert_array_equal(experts['wo'][:, e], ffn['wo'][1:, s, :])
  # Layer 0 stays dense and is copied whole; attention of layer 2 lands in MoE layer 1.
  np.testing.assert_array_equal(params['dense_layers']['block']['ffn']['wi_1'],
                                ffn['wi_1'][:1])
  np.testing.assert_array_equal(params['moe_layers']['moe_block']['attn']['wq'][1],
                                dense_params['dense_layers']['block']['attn']['wq'][2])
  assert not params['moe_layers']['moe_block']['moe']['shared']['wo'].any()


@pytest.mark.parametrize('change,mode,field', [
    ({'expert_ffn_dim': 32}, 'copy', 'expert_ffn_dim=32'),
    ({'expert_ffn_dim': 24}, 'slice', 'must divide 64'),
    ({'d_model': 48}, 'copy', 'model.d_model=48'),
    ({'moe_layer_freq': 2}, 'copy', 'moe_layer_freq=2'),
    ({}, 'clone', '--mode'),
])
def test_bad_pairs_are_refused(change, mode, field):
  dense, moe = _pair(width=64)
  for k, v in change.items():
    (moe.model.moe if k == 'expert_ffn_dim' else moe.model)[k] = v
  with pytest.raises(ConfigError, match=field.replace('.', r'\.')):
    check(dense, moe, mode)


def test_source_must_be_dense():
  _, moe = _pair(width=64)
  with pytest.raises(ConfigError, match='--dense_workdir'):
    check(moe, moe, 'copy')
