"""Hugging Face checkpoints in and out beyond the per-family parity (tests/test_hf_families.py):
workdirs, sharded files, multimodal and MTP checkpoints, tokenizers, fine-tuning, one-line
refusals, the import across two processes. Needs the torch extra."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax.numpy as jnp  # noqa: E402

from moejax import hf  # noqa: E402
from moejax.config import ConfigError  # noqa: E402
from moejax.hf.__main__ import main as hf_main  # noqa: E402
from moejax.training.metrics import read_metrics  # noqa: E402

from hf_models import COMMON, FAMILIES, build as _build, ids as _ids  # noqa: E402


def test_workdir_round_trip(tmp_path):
  """import -> workdir (config.py, Orbax checkpoint) -> export: the same model, with the
  imported config.json's other fields kept and the shards split as asked."""
  ref_model = _build('deepseek_v3', tmp_path / 'hf')
  work, out = tmp_path / 'work', tmp_path / 'out'
  hf.import_workdir(str(tmp_path / 'hf'), str(work), log=lambda *_: None)
  assert (work / 'config.py').exists() and (work / 'hf_config.json').exists()
  hf.export_workdir(str(work), str(out), shard_bytes=40_000, log=lambda *_: None)
  assert (out / 'model.safetensors.index.json').exists()
  again = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  ids = _ids()
  with torch.no_grad():
    np.testing.assert_allclose(again(ids).logits.numpy(), ref_model(ids).logits.numpy(),
                               rtol=0, atol=1e-6)


def test_import_assembles_each_devices_shard_exactly(tmp_path):
  """Imported onto a mesh that splits the model width (fsdp=4) and the experts (expert=2),
  every device's shard is assembled from its slice of the tensors; the export of the workdir
  gives back the original tensors bit for bit (float32 both ways)."""
  from moejax.hf import tensor_files
  _build('qwen2_moe', tmp_path / 'hf')
  report = hf.import_workdir(str(tmp_path / 'hf'), str(tmp_path / 'work'), log=lambda *_: None,
                             overrides={'mesh.data': 1, 'mesh.fsdp': 4, 'mesh.expert': 2})
  assert report['share_read'] == pytest.approx(1.0)  # one process: every tensor
  hf.export_workdir(str(tmp_path / 'work'), str(tmp_path / 'out'), log=lambda *_: None)
  want, got = (tensor_files.Reader(str(tmp_path / n)) for n in ('hf', 'out'))
  assert sorted(got.keys()) == sorted(want.keys())
  for name in want.keys():
    np.testing.assert_array_equal(got.get(name), want.get(name), err_msg=name)


def test_sharded_checkpoint_with_index(tmp_path):
  ref_model = _build('mixtral', tmp_path / 'one')
  ref_model.save_pretrained(str(tmp_path / 'sharded'), max_shard_size='30KB')
  assert os.path.exists(tmp_path / 'sharded' / 'model.safetensors.index.json')
  import jax
  a = hf.load_pretrained(str(tmp_path / 'one'))[1]
  b = hf.load_pretrained(str(tmp_path / 'sharded'))[1]
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow  # the language model's parity: test_hf_families.py[llama4_text]
def test_multimodal_llama4_imports_its_language_model(tmp_path):
  """Llama 4 as published (Llama4ForConditionalGeneration: text_config, 'language_model.'
  tensors): the language model imports and equals transformers' text logits."""
  text = {**COMMON, **FAMILIES['llama4_text'][2]}
  vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                image_size=28, patch_size=14, vision_output_dim=32, projector_input_dim=32,
                projector_output_dim=32)
  torch.manual_seed(0)
  full = transformers.Llama4ForConditionalGeneration(
      transformers.Llama4Config(text_config=text, vision_config=vision)).eval()
  with torch.no_grad():
    for name, p in full.named_parameters():
      if 'experts.' in name and p.ndim == 3:
        p.normal_(0, 0.3)
  full.save_pretrained(str(tmp_path / 'hf'))
  model, variables = hf.load_pretrained(str(tmp_path / 'hf'))
  ids = _ids()
  with torch.no_grad():
    ref = full.language_model(input_ids=ids).logits.numpy()  # its forward needs an image
  logits, _ = model.apply(variables, jnp.asarray(ids.numpy()))
  assert np.abs(np.asarray(logits) - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.slow  # the language model's parity: test_hf_families.py[aria_text]
def test_multimodal_aria_imports_its_language_model(tmp_path):
  """Aria as published (AriaForConditionalGeneration: text_config, 'language_model.' tensors,
  a vision tower and projector beside): the language model imports and equals transformers'
  logits of text alone."""
  text = {**COMMON, **FAMILIES['aria_text'][2]}
  vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32, image_size=28, patch_size=14)
  torch.manual_seed(0)
  full = transformers.AriaForConditionalGeneration(transformers.AriaConfig(
      text_config=text, vision_config=vision, projector_patch_to_query_dict={4: 4})).eval()
  full.save_pretrained(str(tmp_path / 'hf'))
  model, variables = hf.load_pretrained(str(tmp_path / 'hf'))
  ids = _ids()
  with torch.no_grad():
    ref = full(input_ids=ids).logits.numpy()
  logits, aux = model.apply(variables, jnp.asarray(ids.numpy()))
  assert np.abs(np.asarray(logits) - ref).max() <= 1e-4 * np.abs(ref).max()
  assert np.asarray(aux['expert_index']).shape[0] == 3  # every layer routed


def test_deepseek_v3_multi_token_prediction_weights_are_kept(tmp_path):
  """A DeepSeek-V3 checkpoint with its MTP layer (model.layers.L.*, as published; transformers
  saves none): imported as model.mtp.depth=1 with every tensor in place, and exported back
  unchanged."""
  from moejax.hf import convert, export, tensor_files
  _build('deepseek_v3', tmp_path / 'hf')
  reader = tensor_files.Reader(str(tmp_path / 'hf'))
  rng = np.random.default_rng(0)
  extra = {k.replace('layers.2.', 'layers.3.'): np.asarray(reader.get(k)) + 0.01
           for k in reader.keys() if k.startswith('model.layers.2.')}
  d = 32
  extra.update({'model.layers.3.enorm.weight': rng.uniform(0.5, 1.5, d),
                'model.layers.3.hnorm.weight': rng.uniform(0.5, 1.5, d),
                'model.layers.3.eh_proj.weight': rng.normal(0, 0.1, (d, 2 * d)),
                'model.layers.3.shared_head.norm.weight': rng.uniform(0.5, 1.5, d)})
  tensor_files.write(str(tmp_path / 'mtp'), [(k, v.shape, np.float32, lambda v=v: v)
                                             for k, v in extra.items()])
  os.replace(tmp_path / 'mtp' / 'model.safetensors', tmp_path / 'hf' / 'mtp.safetensors')
  names = {k: 'model.safetensors' for k in reader.keys()}
  names.update({k: 'mtp.safetensors' for k in extra})
  (tmp_path / 'hf' / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': names}))
  cfg = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  cfg['num_nextn_predict_layers'] = 1
  (tmp_path / 'hf' / 'config.json').write_text(json.dumps(cfg))
  model, variables = hf.load_pretrained(str(tmp_path / 'hf'))
  assert model.cfg.mtp.depth == 1
  p = variables['params']
  eh = extra['model.layers.3.eh_proj.weight'].astype(np.float32)
  np.testing.assert_array_equal(p['mtp_1_proj'], np.concatenate([eh[:, d:].T, eh[:, :d].T]))
  np.testing.assert_array_equal(p['mtp_1_block']['moe']['router']['w'],
                                extra['model.layers.3.mlp.gate.weight'].T)
  np.testing.assert_array_equal(variables['moe_state']['mtp_1_block']['moe']['bias'],
                                extra['model.layers.3.mlp.gate.e_score_correction_bias'])
  config, _ = convert.moejax_config(cfg, 'test')
  config.model.mtp.depth = 1
  export.export_variables(config, variables, str(tmp_path / 'out'), 'deepseek_v3')
  out = tensor_files.Reader(str(tmp_path / 'out'))
  for name in ('enorm.weight', 'hnorm.weight', 'eh_proj.weight', 'shared_head.norm.weight',
               'mlp.experts.1.down_proj.weight', 'mlp.gate.e_score_correction_bias',
               'self_attn.kv_b_proj.weight'):
    np.testing.assert_array_equal(out.get(f'model.layers.3.{name}'),
                                  extra[f'model.layers.3.{name}'].astype(np.float32), name)
  assert json.loads((tmp_path / 'out' / 'config.json').read_text())['num_nextn_predict_layers'] == 1


@pytest.mark.slow  # 30 training steps: the integration step
def test_imported_model_fine_tunes_with_the_router_and_its_bias_fixed(tmp_path):
  """DeepSeek-V3 imported with the router frozen: 30 fine-tuning steps through
  python -m moejax.main lower the loss, move the experts, and leave the router weights and the
  imported selection bias (bias_update_rate 0) exactly as imported."""
  from moejax import main
  from moejax.generate import load_checkpoint
  from moejax.data import corpus, tokenizer as tokenizers
  _build('deepseek_v3', tmp_path / 'hf')
  texts = [open(f, encoding='utf-8').read() for _, f in corpus.list_files('stdlib')[:20]]
  tokenizers.train_bpe(texts, 320, str(tmp_path / 'tok'))  # the model's vocabulary: 320
  work = tmp_path / 'work'
  assert hf_main(['import', '--hf_dir', str(tmp_path / 'hf'), '--workdir', str(work),
                  '--tokenizer', str(tmp_path / 'tok'),
                  '--config.model.moe.router.freeze=true']) == 0
  assert (work / 'tokenizer.json').exists()
  before = hf.load_pretrained(str(tmp_path / 'hf'))[1]
  args = ['--workdir', str(work), '--config.train.steps=30', '--config.train.lr=3e-3',
          '--config.train.warmup_steps=2', '--config.train.progress=false',
          '--config.train.log_every=5', '--config.train.eval_every=30',
          '--config.data.max_bytes=200000', '--config.data.seq_len=32',
          '--config.train.batch_size=8']
  assert main.main(args) == 0
  rows = [r for r in read_metrics(str(work / 'metrics.jsonl')) if 'train/loss' in r]
  assert rows[-1]['train/loss'] < rows[0]['train/loss'] - 0.3
  _, after = load_checkpoint(str(work))
  moe = ('moe_layers', 'moe_block', 'moe')

  def at(tree, *path):
    for k in path:
      tree = tree[k]
    return np.asarray(tree)
  np.testing.assert_array_equal(at(after['params'], *moe, 'router', 'w'),
                                at(before['params'], *moe, 'router', 'w'))
  bias = at(before['moe_state'], *moe, 'bias')
  assert np.abs(bias).min() > 0  # a real, non-zero imported bias
  np.testing.assert_array_equal(at(after['moe_state'], *moe, 'bias'), bias)
  assert not np.array_equal(at(after['params'], *moe, 'experts', 'wo'),
                            at(before['params'], *moe, 'experts', 'wo'))


def test_import_brings_the_tokenizer_and_generate_speaks_it(tmp_path, capsys):
  from moejax import generate as gen
  from moejax.data import corpus, tokenizer as tokenizers
  texts = [open(f, encoding='utf-8').read() for _, f in corpus.list_files('stdlib')[:20]]
  tokenizers.train_bpe(texts, 320, str(tmp_path / 'hf'))  # tokenizer.json beside the weights
  _build('mixtral', tmp_path / 'hf')
  work = tmp_path / 'work'
  hf.import_workdir(str(tmp_path / 'hf'), str(work), log=lambda *_: None)
  assert (work / 'tokenizer.json').exists()
  assert f"c.data.tokenizer = '{work / 'tokenizer.json'}'" in (work / 'config.py').read_text()
  assert gen.main(['--workdir', str(work), '--prompt', 'def main(', '--max_new_tokens', '6']) == 0
  out = capsys.readouterr().out
  # The command spoke the imported BPE: its text is the BPE decoding of what the model samples
  # from the BPE-encoded prompt (defaults: temperature 0.8, top_p 0.95, seed 0).
  tok = tokenizers.from_dir(str(work))
  assert isinstance(tok, tokenizers.HFTokenizer) and tok.vocab_size == 320
  config, variables = gen.load_checkpoint(str(work))
  ids = gen.generate(config.model, variables, tok.encode('def main(')[None], 6, 0.8, 0.95, 0,
                     eos_id=tok.eos_id, num_tokens=tok.vocab_size)
  assert out == 'def main(' + tok.decode(ids[0]) + '\n'


def test_an_import_without_a_tokenizer_is_not_sampled_or_trained_as_bytes(tmp_path, capsys):
  """A Hugging Face folder without a tokenizer: the import warns, and generate and fine-tuning
  refuse in one line saying how to give it (its ids are not bytes)."""
  from moejax import generate as gen, main
  _build('mixtral', tmp_path / 'hf')
  work = tmp_path / 'work'
  assert hf_main(['import', '--hf_dir', str(tmp_path / 'hf'), '--workdir', str(work)]) == 0
  assert 'has no tokenizer' in capsys.readouterr().out
  assert gen.main(['--workdir', str(work), '--prompt', 'x']) == 2
  err = capsys.readouterr().err.strip()
  assert err.count('\n') == 0 and 'without a tokenizer' in err and '--tokenizer=PATH' in err
  assert main.main(['--workdir', str(work), '--config.train.steps=2',
                    '--config.train.warmup_steps=1']) == 2
  err = capsys.readouterr().err.strip()
  assert "config.data.tokenizer='bytes'" in err and 'imported from Hugging Face' in err


def test_bad_checkpoints_are_one_line_errors(tmp_path):
  _build('mixtral', tmp_path / 'hf')
  cfg = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  for change, match in (
      ({'model_type': 'gpt2'}, "model_type 'gpt2' is not supported; supported: afmoe, "
                               'aria_text, deepseek_v2, deepseek_v3, deepseek_v32, dots1, '),
      ({'model_type': 'kimi_linear'}, "model_type 'kimi_linear' is not supported: it needs "
                                      'a layer layout no repeating pattern gives'),
      ({'hidden_act': 'gelu'}, "hidden_act='gelu' is not supported \\(only SiLU-gated FFNs\\)"),
      ({'attention_bias': True}, 'attention_bias=True is not supported'),
      ({'rope_parameters': {'rope_type': 'dynamic', 'factor': 2.0}},
       "rope_type 'dynamic' is not supported"),
      ({'quantization_config': {'quant_method': 'fp8'}}, 'quantized \\(fp8\\)'),
      ({'hidden_size': 64}, r'tensor model.embed_tokens.weight: shape \[320, 32\], but this '
                            r'config needs \[320, 64\]'),
      ({'num_local_experts': 5}, r'tensor model.layers.0.block_sparse_moe.gate.weight: shape '
                                 r'\[4, 32\], but this config needs \[5, 32\]'),
      ({'num_hidden_layers': 4}, "no tensor 'model.layers.3.input_layernorm.weight'"),
  ):
    (tmp_path / 'hf' / 'config.json').write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ConfigError, match=match):
      hf.load_pretrained(str(tmp_path / 'hf'))
  (tmp_path / 'hf' / 'config.json').write_text(json.dumps(cfg))
  (tmp_path / 'busy').mkdir()
  (tmp_path / 'busy' / 'x').write_text('keep me')
  with pytest.raises(ConfigError, match='not empty'):
    hf.import_workdir(str(tmp_path / 'hf'), str(tmp_path / 'busy'))
  assert (tmp_path / 'busy' / 'x').read_text() == 'keep me'


@pytest.mark.slow  # two processes joined by jax.distributed: the integration step
def test_import_across_two_processes_reads_and_writes_only_its_shards(tmp_path):
  """The documented multi-host import (python -m moejax.hf import --coordinator ...) on two
  processes of 4 CPU devices, the experts split over expert=8: each process reads only its
  devices' experts (their tensors are half of the per-expert ones) and every other tensor once,
  and the one sharded checkpoint they write exports to exactly the tensors of a one-process
  import's export (DeepSeek's rotary dims are exported de-interleaved, so not the original's)."""
  import re
  import socket
  import subprocess
  import sys
  from moejax.hf import tensor_files
  _build('deepseek_v3', tmp_path / 'hf')
  single = hf.import_workdir(str(tmp_path / 'hf'), str(tmp_path / 'one'), log=lambda *_: None)
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': '--xla_force_host_platform_device_count=4 '
                      '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'}
  work = tmp_path / 'two'
  procs = [subprocess.Popen([sys.executable, '-m', 'moejax.hf', 'import',
                             f'--hf_dir={tmp_path / "hf"}', f'--workdir={work}',
                             '--config.mesh.data=1', '--config.mesh.expert=8',
                             f'--coordinator=localhost:{port}', '--num_processes=2',
                             f'--process_id={i}'],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  reader = tensor_files.Reader(str(tmp_path / 'hf'))
  total = sum(reader.nbytes(n) for n in reader.keys())
  experts = sum(reader.nbytes(n) for n in reader.keys() if '.mlp.experts.' in n)
  assert 0.3 < experts / total < 0.9
  # One process reads everything it uses; each of the two reads all but the other's experts.
  want = 100 * (single['share_read'] - experts / 2 / total)
  for i, out in enumerate(outs):
    got = float(re.search(rf'process {i} of 2\); read .* \(([0-9.]+)% of the checkpoint',
                          out).group(1))
    assert got == pytest.approx(want, abs=0.006), out
  for name in ('one', 'two'):
    hf.export_workdir(str(tmp_path / name), str(tmp_path / f'{name}_out'), log=lambda *_: None)
  one, two = (tensor_files.Reader(str(tmp_path / f'{n}_out')) for n in ('one', 'two'))
  assert sorted(one.keys()) == sorted(two.keys()) == sorted(reader.keys())
  for name in reader.keys():
    np.testing.assert_array_equal(two.get(name), one.get(name), err_msg=name)
