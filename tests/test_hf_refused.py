"""Every model type transformers has with routed experts is accounted for: a family entry
(moejax/hf/families.py), a multimodal model whose language model is imported
(convert.LANGUAGE_MODEL), or a refusal that says why (moejax/hf/refused.py)."""
import inspect

import pytest

transformers = pytest.importorskip('transformers')

from moejax.config import ConfigError  # noqa: E402
from moejax.hf import convert, families, refused  # noqa: E402

# The config keys that count a model's routed experts, in any of transformers' spellings.
EXPERT_COUNTS = ('num_experts', 'num_local_experts', 'n_routed_experts', 'moe_num_experts')


def _keys(tree) -> set:
  out = set()
  for k, v in tree.items():
    out |= _keys(v) if isinstance(v, dict) else {k}
  return out


@pytest.fixture(scope='module')
def moe_types():
  """{model_type: its default config (a dict)} of every config class whose default config has
  an experts-count key, at any depth (a multimodal model's text_config too). A class whose
  default config cannot be made is read from its annotations."""
  from transformers.models.auto.configuration_auto import CONFIG_MAPPING
  out = {}
  for kind in CONFIG_MAPPING.keys():
    cls = CONFIG_MAPPING[kind]
    try:
      config = cls().to_dict()
    except Exception:  # noqa: BLE001 (a class with required arguments)
      config = {a: None for k in inspect.getmro(cls) for a in getattr(k, '__annotations__', {})}
    if _keys(config) & set(EXPERT_COUNTS):
      out[kind] = config
  return out


def _refused():
  return {k: v for table in refused.TABLES for k, v in table.items()}


def test_every_moe_model_type_is_imported_or_refused_with_a_reason(moe_types):
  assert len(moe_types) > 100  # the enumeration itself found them (5.25 has 111)
  imported = set(families.FAMILIES) | set(convert.LANGUAGE_MODEL)
  unaccounted = sorted(k for k in moe_types if k not in imported and not refused.reason(k))
  assert not unaccounted, f'neither a family nor refused with a reason: {unaccounted}'


def test_the_tables_name_real_moe_types_once(moe_types):
  """No stale or misspelled name (nllb-moe, not nllb_moe); no type both imported and refused;
  no type in two refusal tables."""
  assert sum(len(t) for t in refused.TABLES) == len(_refused())
  assert set(_refused()) <= set(moe_types), set(_refused()) - set(moe_types)
  assert set(families.FAMILIES) <= set(moe_types)
  assert not set(_refused()) & (set(families.FAMILIES) | set(convert.LANGUAGE_MODEL))


def test_a_multimodal_refusal_names_transformers_own_language_model(moe_types):
  """Each multimodal entry's language model is its config's text_config (through a thinker),
  itself accounted for; the imported ones likewise."""
  def text_type(config):
    node = config.get('thinker_config', config)
    return node['text_config']['model_type']
  for kind, text in {**refused.MULTIMODAL, **{k: v[0] for k, v in
                                              convert.LANGUAGE_MODEL.items()}}.items():
    assert text_type(moe_types[kind]) == text, kind
    assert text in families.FAMILIES or refused.reason(text), kind


def test_what_is_refused_as_no_language_model_is_not_a_causal_lm_in_transformers():
  from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
  for kind in refused.NOT_A_LANGUAGE_MODEL:
    assert kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, kind


@pytest.mark.parametrize('kind,says', [
    ('kimi_linear', 'no repeating pattern'), ('mistral_large4_text', 'no query latent'),
    ('qwen3_omni_moe', "language model is model_type 'qwen3_omni_moe_text'.*MRoPE"),
    ('kimi_k25', "'deepseek_v3', which moejax imports from a checkpoint of its own"),
    ('nllb-moe', 'encoder-decoder'), ('dbrx', 'clip_qkv'),
    ('cohere2_moe', 'parallel attention and FFN sublayers'),
])
def test_the_import_refuses_in_one_line_with_the_reason(kind, says):
  with pytest.raises(ConfigError, match=f"model_type '{kind}' is not supported: .*{says}") as e:
    families.family({'model_type': kind}, 'x/config.json')
  assert '\n' not in str(e.value)
