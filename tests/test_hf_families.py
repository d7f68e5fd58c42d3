"""Every Hugging Face family moejax imports against transformers itself, on a tiny random
model of it (tests/hf_models.py): logits and routing, export, the entry's keys both ways, what
export refuses; greedy generation, a bfloat16 import and gpt-oss fine-tuning in the slow step."""
import json

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax.numpy as jnp  # noqa: E402

from moejax import hf  # noqa: E402
from moejax.config import ConfigError  # noqa: E402
from moejax.generate import generate  # noqa: E402
from moejax.hf.__main__ import main as hf_main  # noqa: E402
from moejax.training.metrics import read_metrics  # noqa: E402

from hf_models import COMMON, FAMILIES, build as _build, ids as _ids  # noqa: E402


@pytest.fixture(scope='module', params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  folder = tmp_path_factory.mktemp(request.param)
  return request.param, folder, _build(request.param, folder)


def test_logits_and_routing_equal_transformers(family):
  kind, folder, ref_model = family
  ids = _ids()
  chosen = []  # every routed layer's (T, K) expert indices, as transformers' routers return

  k = ref_model.config.get_text_config().num_experts_per_tok

  def record(module, inputs, output):
    if isinstance(output[-1], torch.Tensor) and not output[-1].is_floating_point():
      chosen.append(np.sort(output[-1].numpy(), -1))  # (logits, weights, indices)
    else:  # Llama 4: (scores, logits), scores zero off the chosen experts
      chosen.append(np.sort(torch.topk(output[0], k, dim=-1).indices.numpy(), -1))
  hooks = [mod.register_forward_hook(record) for name, mod in ref_model.named_modules()
           if name.endswith(('.gate', '.router')) and not name.endswith('.router.gate') and (
               hasattr(mod, 'wg') or hasattr(mod, 'top_k') or (
                   hasattr(mod, 'weight') and mod.weight.ndim == 2 and mod.weight.shape[0] > 1))]
  with torch.no_grad():
    ref = ref_model(ids).logits.numpy()
  for h in hooks:
    h.remove()
  model, variables = hf.load_pretrained(str(folder))
  logits, aux = model.apply(variables, jnp.asarray(ids.numpy()))
  assert np.abs(np.asarray(logits) - ref).max() <= 1e-4 * np.abs(ref).max()
  # The same experts chosen in every routed layer (as sets: ties aside, order is free).
  ours = np.sort(np.asarray(aux['expert_index']), -1)  # [moe layers, T, K]
  # As many routed layers as transformers' routers ran (all 3, or 2 beside a dense layer).
  assert len(chosen) == ours.shape[0] in (2, 3)
  for layer, want in enumerate(chosen):
    np.testing.assert_array_equal(ours[layer], want.reshape(ours[layer].shape))


@pytest.mark.slow  # 16 decoding steps per family: the integration step
def test_greedy_generation_equals_transformers(family):
  kind, folder, ref_model = family
  prompt = _ids()[:1, :5]
  with torch.no_grad():
    want = ref_model.generate(prompt, max_new_tokens=16, do_sample=False, min_new_tokens=16)
  model, variables = hf.load_pretrained(str(folder))
  got = generate(model.cfg, variables, prompt.numpy(), 16, temperature=0.0, stop_at_eos=False,
                 eos_id=-1)  # no EOS: all 16 tokens
  np.testing.assert_array_equal(got[0], want[0, 5:].numpy())


def test_export_loads_in_transformers_with_the_same_logits(family, tmp_path):
  from moejax.hf import convert, export, families
  kind, folder, ref_model = family
  text, _ = convert.text_model(json.loads((folder / 'config.json').read_text()))
  config, _ = convert.moejax_config(text, 'test')
  variables = hf.load_pretrained(str(folder))[1]
  out_kind = families.FAMILIES[kind].exports_as or kind  # a causal LM transformers loads
  export.export_variables(config, variables, str(tmp_path / 'out'), out_kind)
  again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'out')).eval()
  assert type(again).__name__ == families.FAMILIES[out_kind].architecture
  ids = _ids()
  with torch.no_grad():
    np.testing.assert_allclose(again(ids).logits.numpy(), ref_model(ids).logits.numpy(),
                               rtol=0, atol=1e-6)


@pytest.mark.slow  # a second import of each family: the integration step
def test_bfloat16_import_runs(family):
  kind, folder, ref_model = family
  model, variables = hf.load_pretrained(str(folder), dtype='bfloat16')
  assert variables['params']['embedding'].dtype == jnp.bfloat16
  logits, _ = model.apply(variables, jnp.asarray(_ids().numpy()))
  with torch.no_grad():
    ref = ref_model(_ids()).logits.numpy()
  assert np.isfinite(np.asarray(logits)).all()
  # bfloat16 rounding can flip a near-tie in routing for a token (then its logits differ by a
  # whole expert): the typical logit stays within 1% of the scale, not every one.
  err = np.abs(np.asarray(logits) - ref)
  assert np.median(err) <= 0.01 * np.abs(ref).max()
  assert np.mean(err.max(-1) <= 0.05 * np.abs(ref).max()) >= 0.75  # most tokens close


def test_the_supported_list_is_the_table_and_every_family_is_tested():
  """The refusal lists the table's families, and this file builds a tiny model of each."""
  from moejax.hf import families
  with pytest.raises(ConfigError, match=', '.join(sorted(families.FAMILIES)) + '$'):
    families.family({'model_type': 'gpt2'}, 'x')
  assert set(families.FAMILIES) == set(FAMILIES)


def _moejax_model(**fields):
  from moejax.config import base_config, set_fields
  c = base_config()
  set_fields(c, {'model.first_k_dense': 0, 'model.moe.num_shared_experts': 0, **fields})
  return c


@pytest.mark.parametrize('model_type,fields,named', [
    ('mixtral', {}, None),  # expressible: exported
    ('mixtral', {'model.moe.num_shared_experts': 1}, 'num_shared_experts=1'),
    ('mixtral', {'model.tie_embeddings': True}, 'tie_embeddings=True'),
    ('mixtral', {'model.sliding_window': 8, 'model.sliding_pattern': (1, 0)},
     r'sliding_pattern=\(1, 0\)'),  # mixtral windows every layer or none
    ('mixtral', {'model.rope_layers': 'windowed'}, None),  # no window: every layer rotates
    ('mixtral', {'model.sliding_window': 8, 'model.rope_layers': 'windowed'},
     "rope_layers='windowed'"),
    ('gpt_oss', {'model.sliding_window': 8, 'model.sliding_pattern': (1, 0)}, 'qkv_bias=False'),
    ('qwen3_moe', {'model.qk_norm': 'head', 'model.attention_sinks': True},
     'attention_sinks=True'),
    ('qwen2_moe', {'model.moe.router.score_fn': 'sigmoid'}, "score_fn='sigmoid'"),
    ('deepseek_v3', {'model.attention': 'mla', 'model.moe.router.score_fn': 'sigmoid',
                     'model.moe.router.num_groups': 4, 'model.moe.router.topk_groups': 2,
                     'model.moe.router.group_score': 'max'}, 'group_score'),
])
def test_export_writes_only_what_the_family_expresses(model_type, fields, named):
  """Export reads its config.json back through the family's entry: a model that does not come
  back as it is gets one line naming the fields."""
  from moejax.hf import families
  c = _moejax_model(**fields)
  if named is None:
    hf_cfg = families.hf_config(c, None, model_type)
    assert families.model_fields(hf_cfg, 'back')['model.moe.num_experts'] == 8
    return
  with pytest.raises(ConfigError, match=f'--model_type={model_type}: .*{named}'):
    families.hf_config(c, None, model_type)


def test_a_family_entry_round_trips_every_field_it_reads():
  """For each family, import -> export -> import gives the same fields (the keys and rules are
  inverse to each other), from a config.json transformers itself wrote."""
  from moejax.hf import convert, families
  for kind, (cfg_cls, _, extra) in FAMILIES.items():
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra}).to_dict()
    cfg['model_type'] = kind
    fields = families.model_fields(cfg, kind)
    c, _ = convert.moejax_config(cfg, kind)
    again = families.model_fields(families.hf_config(c, None, kind), kind)
    assert again == fields, kind


def test_a_config_json_in_a_familys_own_key_names_imports_the_same():
  """The keys a family's original checkpoints name their own way (Sarvam's num_experts,
  use_qkv_bias, ...) import as transformers' names do; every such name transformers itself
  maps (its config class's attribute_map) is in the entry."""
  from moejax.hf import families
  for kind, (cfg_cls, _, extra) in FAMILIES.items():
    fam = families.FAMILIES[kind]
    if not fam.renamed:
      continue
    assert fam.renamed == getattr(transformers, cfg_cls).attribute_map, kind
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra}).to_dict()
    cfg['model_type'] = kind
    want = families.model_fields(cfg, kind)
    for theirs, ours in fam.renamed.items():
      if ours in cfg:
        own = {theirs if k == ours else k: v for k, v in cfg.items()}
        assert families.model_fields(own, kind) == want, (kind, theirs)


def test_layer_types_with_linear_layers_read_and_write_back():
  """Gated DeltaNet layers by layer_types: the repeating period (a windowed family's other
  layers by their own kind; a linear layer may sit at any place of the window pattern), the
  interval transformers fills in without layer_types, and one line for a list moejax cannot
  build."""
  from moejax.hf import convert, families
  from moejax.hf.rules import _period
  assert _period([None, 1, None, 0, 1]) == [0, 1, 0]  # the linear layers' places free
  assert _period([None, 1, None, 0, 1, None, 1]) == [1, 1, 1, 0]
  assert _period([None, 1, None, 0, 1] * 2) == [0, 1, 0, 0, 1]
  assert _period([None, 1, None, 1]) == [1]  # windows on every attention layer
  assert _period([1, 0, 1, 1]) == [1, 0, 1]  # a period need not divide the length
  lara = transformers.LaraMiniConfig(**{**COMMON, **FAMILIES['lara_mini'][2],
                                        'num_hidden_layers': 10, 'layer_types': None}).to_dict()
  types = lara['layer_types']  # transformers' released period of 5
  assert types[:5] == ['linear_attention', 'sliding_attention', 'linear_attention',
                       'full_attention', 'sliding_attention'] and types[5:] == types[:5]
  f = families.model_fields(lara, 'x')
  assert f['model.linear_pattern'] == (1, 0, 1, 0, 0)
  assert f['model.sliding_pattern'] == (0, 1, 0, 0, 1) and f['model.sliding_window'] == 4
  c, _ = convert.moejax_config(lara, 'x')
  assert families.hf_config(c, None, 'lara_mini')['layer_types'] == types
  nxt = transformers.Qwen3NextConfig(**{**COMMON, **FAMILIES['qwen3_next'][2]}).to_dict()
  nxt.pop('layer_types')
  for interval, pattern in ((4, (1, 1, 1, 0)), (2, (1, 0)), (1, ())):
    nxt.update(num_hidden_layers=8, full_attention_interval=interval, mlp_only_layers=[])
    assert families.model_fields(nxt, 'x')['model.linear_pattern'] == pattern
  for types, says in (([*['linear_attention'] * 7, 'mamba'], "layer_types has 'mamba' layers"),
                      (['linear_attention'] * 7, 'has 7 entries for num_hidden_layers=8')):
    with pytest.raises(ConfigError, match=says):
      families.model_fields({**nxt, 'layer_types': types}, 'x')


@pytest.mark.slow  # fine-tuning through the command line: the integration step
def test_gpt_oss_fine_tunes_and_exports_with_parity(tmp_path):
  """gpt-oss imported, fine-tuned by python -m moejax.main (every kind of its weights moves:
  sinks, attention, router and expert biases, the stacked experts), exported: transformers
  computes the fine-tuned model's logits as moejax does."""
  from moejax import main
  from moejax.data import corpus, tokenizer as tokenizers
  from moejax.generate import load_checkpoint
  from moejax.model.transformer import Transformer
  _build('gpt_oss', tmp_path / 'hf')
  texts = [open(f, encoding='utf-8').read() for _, f in corpus.list_files('stdlib')[:20]]
  tokenizers.train_bpe(texts, 320, str(tmp_path / 'tok'))
  work, out = tmp_path / 'work', tmp_path / 'out'
  assert hf_main(['import', '--hf_dir', str(tmp_path / 'hf'), '--workdir', str(work),
                  '--tokenizer', str(tmp_path / 'tok')]) == 0
  before = hf.load_pretrained(str(tmp_path / 'hf'))[1]
  assert main.main(['--workdir', str(work), '--config.train.steps=12', '--config.train.lr=3e-3',
                    '--config.train.warmup_steps=2', '--config.train.progress=false',
                    '--config.train.log_every=4', '--config.train.eval_every=12',
                    '--config.data.max_bytes=100000', '--config.data.seq_len=32',
                    '--config.train.batch_size=8']) == 0
  rows = [r for r in read_metrics(str(work / 'metrics.jsonl')) if 'train/loss' in r]
  assert rows[-1]['train/loss'] < rows[0]['train/loss']
  config, after = load_checkpoint(str(work))
  block = ('moe_layers', 'moe_block')
  for path in (('attn', 'sinks'), ('attn', 'bo'), ('moe', 'router', 'b'),
               ('moe', 'experts', 'bi_0'), ('moe', 'experts', 'wi_1')):
    a, b = after['params'], before['params']
    for k in block + path:
      a, b = a[k], b[k]
    assert not np.array_equal(np.asarray(a), np.asarray(b)), path
  hf.export_workdir(str(work), str(out), log=lambda *_: None)
  again = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  ids = _ids()
  ours, _ = Transformer(config.model, train=False).apply(after, jnp.asarray(ids.numpy()))
  with torch.no_grad():
    theirs = again(ids).logits.numpy()
  assert np.abs(np.asarray(ours) - theirs).max() <= 1e-4 * np.abs(theirs).max()
