"""Numerical parity with Hugging Face transformers' PyTorch MoE blocks (tiny random configs,
float32, on the CPU, nothing downloaded). PyTorch weights are copied into moejax; outputs must
agree to 1e-5 relative error and the selected experts must be the same sets.

Needs the `torch` extra (pip install -e ".[dev,torch,data]"), which .ci/run installs.
"""
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moejax.config import base_config
from moejax.moe.layer import MoEFFN

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds3  # noqa: E402
from transformers.models.mixtral import modeling_mixtral as mixtral  # noqa: E402

D, F, T = 32, 16, 40


def _t(x):
  return np.asarray(x.detach().numpy(), np.float32)


def _experts_params(experts):
  gate_up, down = _t(experts.gate_up_proj), _t(experts.down_proj)  # [E, 2F, D], [E, D, F]
  return {'wi_0': gate_up[:, :F, :].transpose(0, 2, 1), 'wi_1': gate_up[:, F:, :].transpose(0, 2, 1),
          'wo': down.transpose(0, 2, 1)}


def _moe_cfg(n, k, shared, **router):
  moe = base_config().model.moe
  moe.num_experts, moe.num_experts_per_tok, moe.expert_ffn_dim = n, k, F
  moe.num_shared_experts = shared
  moe.dispatch.name, moe.experts.block_size = 'dropless', 8
  for key, v in router.items():
    moe.router[key] = v
  return moe


def _rel_err(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _random_init(module, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_mixtral_sparse_moe_block():
  cfg = transformers.MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=8,
                                   num_experts_per_tok=2, router_jitter_noise=0.0)
  block = mixtral.MixtralSparseMoeBlock(cfg).eval()
  _random_init(block, 0)
  x = torch.randn(2, T // 2, D, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    ref = _t(block(x))
    _, _, ref_idx = block.gate(x.reshape(-1, D))

  moe = _moe_cfg(8, 2, 0, norm_topk_prob=True)  # Mixtral: softmax over the K kept
  layer = MoEFFN(ml_collections.FrozenConfigDict(moe), D)
  params = {'params': {'router': {'w': _t(block.gate.weight).T},
                       'experts': _experts_params(block.experts)}}
  y, _ = layer.apply(params, jnp.asarray(_t(x)), train=False)
  assert _rel_err(np.asarray(y), ref) <= 1e-5
  ours = layer.apply(params, jnp.asarray(_t(x)), train=False, method=_routing)
  assert _same_sets(ours, ref_idx)


def _routing(layer, x, train):
  from moejax.moe import registry
  tokens = x.reshape(-1, x.shape[-1])
  bias = layer.variables.get('moe_state', {}).get('bias')  # the layer's selection bias
  return layer.variables and registry.make_router(layer.moe, 258).apply(
      {'params': layer.variables['params']['router']}, tokens, None, train,
      **({} if bias is None else {'bias': bias})).expert_index


def _same_sets(ours, theirs):
  ours, theirs = np.asarray(ours), theirs.numpy()
  return all(set(a) == set(b) for a, b in zip(ours.tolist(), theirs.tolist()))


def _deepseek_v3(bias_seed):
  cfg = transformers.DeepseekV3Config(
      hidden_size=D, moe_intermediate_size=F, n_routed_experts=16, num_experts_per_tok=4,
      n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
      norm_topk_prob=True, num_hidden_layers=1, vocab_size=64, intermediate_size=64)
  block = ds3.DeepseekV3MoE(cfg).eval()
  _random_init(block, 2)
  bias = torch.randn(16, generator=torch.Generator().manual_seed(bias_seed)) * 0.5
  block.gate.e_score_correction_bias.copy_(bias)
  return block


@pytest.mark.parametrize('bias_seed', [3, 4])
def test_deepseek_v3_moe_block(bias_seed):
  """Sigmoid gate, non-zero correction bias, group-limited routing (4 groups, keep 2), one
  shared expert, routed_scaling_factor 2.5."""
  block = _deepseek_v3(bias_seed)
  x = torch.randn(2, T // 2, D, generator=torch.Generator().manual_seed(5))
  with torch.no_grad():
    ref = _t(block(x))
    _, _, ref_idx = block.gate(x)

  moe = _moe_cfg(16, 4, 1, score_fn='sigmoid', norm_topk_prob=True, routed_scaling_factor=2.5,
                 num_groups=4, topk_groups=2, group_score='top2_sum')
  moe.balance.bias_update_rate = 1e-3  # creates the bias state; not updated at eval
  layer = MoEFFN(ml_collections.FrozenConfigDict(moe), D)
  s = block.shared_experts
  variables = {
      'params': {'router': {'w': _t(block.gate.weight).T},
                 'experts': _experts_params(block.experts),
                 'shared': {'wi_0': _t(s.gate_proj.weight).T, 'wi_1': _t(s.up_proj.weight).T,
                            'wo': _t(s.down_proj.weight).T}},
      'moe_state': {'bias': _t(block.gate.e_score_correction_bias)}}
  y, _ = layer.apply(variables, jnp.asarray(_t(x)), train=False)
  assert _rel_err(np.asarray(y), ref) <= 1e-5
  ours = layer.apply(variables, jnp.asarray(_t(x)), train=False, method=_routing)
  assert _same_sets(ours, ref_idx)


def test_deepseek_v3_group_masking_is_minus_inf_in_this_version():
  """Older releases of this reference filled masked groups with 0.0; with a negative bias that
  selects experts from masked groups (see test_routers_zoo). The installed release masks with
  -inf, like the paper and moejax: check on a case where the two conventions disagree."""
  block = _deepseek_v3(3)
  with torch.no_grad():
    block.gate.e_score_correction_bias.fill_(-2.0)  # every biased score < 0
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(6))
    _, _, idx = block.gate(x)
    scores = torch.sigmoid(x @ block.gate.weight.T) - 2.0
    groups = scores.view(T, 4, 4).topk(2, dim=-1)[0].sum(-1).topk(2, dim=-1)[1]
  for row, kept in zip(idx.tolist(), groups.tolist()):
    assert {e // 4 for e in row} <= set(kept)
