"""Decoding with a cache gives the same logits as a full forward pass (GQA and MLA; dropless
top-K, sigmoid group-limited, hash and position-priority capacity routing), and sampling
behaves."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moejax.config import ConfigError
from moejax.generate import decode, decoding_model, empty_cache, generate, sample_token
from moejax.model.transformer import Transformer

from conftest import tiny_config


def _cfg(attention):
  c = tiny_config()
  c.model.attention = attention
  c.model.mla.q_lora_rank, c.model.mla.kv_lora_rank = 16, 12
  c.model.mla.qk_nope_head_dim, c.model.mla.qk_rope_head_dim, c.model.mla.v_head_dim = 8, 4, 8
  return c.model


# Causal routing paths beyond dropless softmax top-K (which both attention kinds use).
ROUTING = {
    'sigmoid_group_limited': {'router.score_fn': 'sigmoid', 'router.num_groups': 4,
                              'router.topk_groups': 2, 'router.routed_scaling_factor': 2.5},
    'hash': {'router.name': 'hash'},
    # Position priority only looks at earlier tokens; a capacity that covers every token keeps
    # a 1-token decoding step and the full forward from dropping differently.
    'capacity_position': {'dispatch.name': 'capacity', 'dispatch.priority': 'position',
                          'dispatch.eval_capacity_factor': 8.0},
}


# Attention features whose masks or extra columns must hold on the cache too: a window of 3
# on alternate layers (the prefill of 5 and the single steps both cross it), sinks, the output
# gate and bias, partial rotary with yarn scaling.
FEATURES = {'window_sinks_gate': {'sliding_window': 3, 'sliding_pattern': (1, 0),
                                  'attention_sinks': True, 'attention_out_bias': True,
                                  'attention_output_gate': True, 'rotary_dim': 4}}


@pytest.mark.parametrize('attention,routing', [('gqa', None), ('mla', None)] +
                         [('gqa', r) for r in ROUTING] + [('gqa', f) for f in FEATURES])
def test_incremental_decoding_equals_full_forward(attention, routing):
  m = _cfg(attention)
  for key, value in ROUTING.get(routing, {}).items():
    group, field = key.split('.')
    m.moe[group][field] = value
  for key, value in FEATURES.get(routing, {}).items():
    m[key] = value
  if routing in FEATURES:
    m.rope_scaling.kind, m.rope_scaling.factor, m.rope_scaling.original_max_len = 'yarn', 4., 8
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 256)
  full_model = Transformer(ml_collections.FrozenConfigDict(m), train=False)
  variables = jax.jit(full_model.init)(jax.random.key(1), tokens)
  full_logits, _ = jax.jit(full_model.apply)(variables, tokens)
  model = decoding_model(m, cache_len=12)
  cache = empty_cache(model, 2)
  # Numbers cached per token and layer (leaves are [layers, batch, cache_len, ...]): MLA keeps
  # only its latent (kv_lora_rank 12) and rotary key (4); GQA keys and values, 2 x 2 heads x 8.
  leaves = [v for p, v in jax.tree_util.tree_leaves_with_path(cache) if 'index' not in str(p)]
  per_token = sum(v.shape[0] * int(np.prod(v.shape[3:])) for v in leaves) / m.num_layers
  assert per_token == (12 + 4 if attention == 'mla' else 2 * 2 * 8)
  # prefill 5 tokens, then one token at a time
  pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
  logits, cache = decode(model, variables, cache, tokens[:, :5], pos[:, :5])
  steps = [logits]
  for i in range(5, 12):
    logits, cache = decode(model, variables, cache, tokens[:, i:i + 1], pos[:, i:i + 1])
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full_logits, rtol=1e-4, atol=1e-4)


def test_sampling():
  logits = jnp.log(jnp.array([[0.7, 0.2, 0.1]] * 4000))
  assert (sample_token(logits, jax.random.key(0), 0.0, 1.0) == 0).all()
  drawn = np.asarray(sample_token(logits, jax.random.key(0), 1.0, 1.0))
  np.testing.assert_allclose(np.bincount(drawn, minlength=3) / 4000, [.7, .2, .1], atol=0.03)
  # top_p 0.8 keeps the tokens whose preceding mass is below 0.8: 0 and 1, never 2.
  drawn = np.asarray(sample_token(logits, jax.random.key(1), 1.0, 0.8))
  assert set(drawn.tolist()) == {0, 1}


def test_generate_refuses_non_causal_routing():
  m = tiny_config().model
  m.moe.dispatch.name, m.moe.dispatch.priority = 'capacity', 'choice'
  with pytest.raises(ConfigError, match='non-causally'):
    generate(m, {}, np.zeros((1, 3), np.int32), 4)
