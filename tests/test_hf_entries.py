"""The family table's rules away from their defaults: every key an entry reads changes what it
imports, a key a config.json leaves out means what transformers makes of it, and the rules the
tiny models never reach by their defaults (MoE layers by start and interval, head_dim beside
hidden / heads under partial rotary, interleaved pairs of a partial rotation) by hand."""
import json
import types

import numpy as np
import pytest

from moejax.errors import ConfigError
from moejax.hf import families
from moejax.hf.rules import Const, Key, Rope, SlidingLayers, moe_layers
from moejax.hf.weights import _heads


@pytest.mark.parametrize('keys,want', [
    # transformers' Ernie 4.5: (i + 1) % interval == 0 and start <= i <= end
    (dict(moe_layer_start_index=1, moe_layer_end_index=5, moe_layer_interval=2), [1, 3, 5]),
    (dict(moe_layer_start_index=2, moe_layer_end_index=-1, moe_layer_interval=3), [2, 5]),
    (dict(moe_layer_start_index=0, moe_layer_end_index=3, moe_layer_interval=1), [0, 1, 2, 3]),
    (dict(interleave_moe_layer_step=2), [1, 3, 5]),
    (dict(first_k_dense_replace=1, moe_layer_freq=2), [1, 3, 5]),
    (dict(decoder_sparse_step=2, mlp_only_layers=[3]), [1, 5]),
    (dict(decoder_sparse_step=1, mlp_only_layers=[0, 4]), [1, 2, 3, 5]),
    (dict(moe_layers=[4, 0]), [0, 4]),
])
def test_moe_layers_by_every_spelling(keys, want):
  assert moe_layers({'num_hidden_layers': 6, **keys}) == want


def test_head_dim_key_sets_the_rotated_dims_under_partial_rotary():
  """rotary_dim = head_dim x partial_rotary_factor with head_dim the config.json's own (16),
  not hidden / heads (8)."""
  hf = {'hidden_size': 32, 'num_attention_heads': 4, 'head_dim': 16,
        'rope_parameters': {'rope_theta': 1e4, 'partial_rotary_factor': 0.5}}
  assert Rope().read(hf, 'x')['model.rotary_dim'] == 8
  del hf['head_dim']
  assert Rope().read(hf, 'x')['model.rotary_dim'] == 4


def test_interleaved_pairs_of_a_partial_rotation_reorder_only_the_rotated_dims():
  """4 of 8 dims rotated, stored as pairs (x0, x1), (x2, x3): moejax's halves take evens then
  odds of the rotated part, [0, 2, 1, 3], and keep the rest in place; export inverts it."""
  m = types.SimpleNamespace(num_heads=2, head_dim=8, rotary_dim=4)
  to_moejax, to_hf = _heads('num_heads', interleaved=True)
  w = np.arange(16, dtype=np.float32)[:, None] * np.ones((1, 3))  # [H * hd, D]: row = its index
  got = to_moejax(w, m)  # [D, H, hd]
  np.testing.assert_array_equal(got[0, 0], [0, 2, 1, 3, 4, 5, 6, 7])
  np.testing.assert_array_equal(got[0, 1], [8, 10, 9, 11, 12, 13, 14, 15])
  np.testing.assert_array_equal(to_hf(got, m), w)
  m.rotary_dim = 0  # all dims rotated
  np.testing.assert_array_equal(to_moejax(w, m)[0, 0], [0, 2, 4, 6, 1, 3, 5, 7])


def _tiny_configs():
  transformers = pytest.importorskip('transformers')
  from hf_models import COMMON, FAMILIES
  transformers.logging.set_verbosity_error()
  for kind, (cfg_cls, _, extra) in sorted(FAMILIES.items()):
    cls = getattr(transformers, cfg_cls)
    hf = cls(**{**COMMON, **extra}).to_dict()
    hf['model_type'] = kind
    yield kind, cls, hf


def _default_configs():
  """Each family's config class at its defaults (the published model's shape, where a key
  left out often means something else than in the tiny one: kv heads, positions), with the
  tiny model's value for a count the class leaves None."""
  transformers = pytest.importorskip('transformers')
  from hf_models import COMMON, FAMILIES
  for kind, (cfg_cls, _, extra) in sorted(FAMILIES.items()):
    cls = getattr(transformers, cfg_cls)
    hf = cls().to_dict()
    hf.update({k: v for k, v in {**COMMON, **extra}.items() if hf.get(k, 0) is None})
    hf['model_type'] = kind
    yield kind, cls, hf


def _fields(hf, kind):
  try:
    return families.model_fields(hf, kind)
  except ConfigError:
    return None  # refused in one line: not a silently different model


@pytest.mark.parametrize('configs', [_tiny_configs, _default_configs])
def test_a_missing_key_means_what_transformers_reads(configs):
  """For each family and each key of its config.json (the tiny model's, and the class's
  defaults): leave the key out; moejax imports what transformers makes of the same file (its
  class default, or a value derived from other keys), or refuses it. Compares every imported
  field."""
  checked = 0
  for kind, cls, hf in configs():
    for key in sorted(hf):
      if key == 'model_type':
        continue
      rest = {k: v for k, v in hf.items() if k != key}
      ours = _fields(rest, kind)
      if ours is None:
        continue
      try:
        theirs = cls.from_dict({k: v for k, v in rest.items() if k != 'model_type'}).to_dict()
      except Exception:  # noqa: BLE001 (transformers refuses the file: nothing to compare)
        continue
      theirs['model_type'] = kind
      assert ours == _fields(theirs, kind), (kind, key)
      checked += 1
  assert checked > 300


def _changed(value):
  if isinstance(value, bool):
    return not value
  if isinstance(value, int):
    return value + 1
  if isinstance(value, float):
    return value * 2 + 0.5
  return None


def test_every_key_an_entry_reads_changes_the_import():
  """Each Key of each entry, set to another value in the family's config.json, changes the
  imported fields (or is refused); each Const at another value is refused, naming the key."""
  for kind, _, hf in _tiny_configs():
    base = families.model_fields(hf, kind)
    for piece in families.FAMILIES[kind].config:
      if isinstance(piece, Const):
        other = 'gelu' if isinstance(piece.value, str) else (
            not piece.value if isinstance(piece.value, bool) else 3.0)
        with pytest.raises(ConfigError, match=piece.hf):
          families.model_fields({**hf, piece.hf: other}, kind)
      elif isinstance(piece, Key):
        key = next((k for k in (piece.hf,) + piece.aliases if hf.get(k) is not None), None)
        value = _changed(hf[key]) if key else _changed(piece.default)
        if value is None:
          continue
        changed = _fields({**hf, key or piece.hf: value}, kind)
        assert changed != base, (kind, piece.hf)


def test_gpt_oss_without_swiglu_keys_reads_transformers_gate():
  """gpt-oss's config.json written before swiglu_alpha / swiglu_limit were keys: the gate's
  1.702 and the clamp at 7 (transformers' GptOssConfig), as the file of today writes them."""
  transformers = pytest.importorskip('transformers')
  d = transformers.GptOssConfig()
  hf = json.loads(d.to_json_string())
  hf.pop('swiglu_alpha', None)
  hf.pop('swiglu_limit', None)
  hf['model_type'] = 'gpt_oss'
  f = families.model_fields(hf, 'gpt_oss')
  assert (f['model.moe.experts.alpha'], f['model.moe.experts.limit']) == (1.702, 7.0)
  assert (d.swiglu_alpha, d.swiglu_limit) == (1.702, 7.0)


def test_a_family_with_layer_types_refuses_a_window_without_them():
  rule = SlidingLayers(layer_types=True)
  with pytest.raises(ConfigError, match='sliding_window=8 but no layer_types; add layer_types'):
    rule.read({'sliding_window': 8}, 'gpt_oss')
  assert rule.read({'sliding_window': 8, 'layer_types': ['sliding_attention', 'full_attention']},
                   'x') == {'model.sliding_window': 8, 'model.sliding_pattern': (1, 0)}
  assert SlidingLayers().read({'sliding_window': 8}, 'x')['model.sliding_pattern'] == (1,)


def test_a_refused_export_names_the_families_that_can_express_the_model():
  """A softmax top-2 model asked as deepseek_v3 (sigmoid routing): refused, naming the
  families that can (mixtral among them, and the one line still says what is missing); an
  expert-choice model: no family can."""
  from moejax.config import base_config, set_fields
  from moejax.hf.export import check_expressible
  c = base_config()
  set_fields(c, {'model.first_k_dense': 0, 'model.moe.num_shared_experts': 0})
  with pytest.raises(ConfigError, match=r"^--model_type=deepseek_v3: scoring_func='softmax' .*; "
                                        r'--model_type=(\w+ or )*mixtral( or \w+)* can express it$'):
    check_expressible(c, None, 'deepseek_v3')
  check_expressible(c, None, 'mixtral')
  c.model.moe.router.name = 'expert_choice'
  with pytest.raises(ConfigError, match='; no family moejax exports can express it$'):
    check_expressible(c, None, 'mixtral')
