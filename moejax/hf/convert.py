"""Hugging Face -> moejax: configs, parameters, workdirs (the other way: export.py).

`load_pretrained(hf_dir)` -> (model, variables) for `model.apply(variables, ids)`;
`import_workdir(hf_dir, workdir)` writes a workdir that `moejax.main` fine-tunes and
`moejax.generate` samples from.

Memory: the Hugging Face weights are memory-mapped and read one tensor at a time.
`load_pretrained` assembles each moejax parameter on the host in turn (one float32 copy of the
model plus one tensor). `import_workdir` assembles every device's shard of every parameter
straight from the tensors it needs (`jax.make_array_from_callback`), so a process holds only
its devices' shards (plus one tensor) and reads only its share of the files: across hosts
(`--coordinator` / `--distributed`, as for training) a checkpoint larger than any host converts
into one sharded Orbax checkpoint, each host writing its shards.
"""
from __future__ import annotations

import functools
import json
import os
import resource

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from moejax.config import base_config, set_fields
from moejax.errors import ConfigError
from moejax.hf import families, tensor_files, weights

DTYPES = {'float32': np.float32, 'bfloat16': jnp.bfloat16}
# Layer state no Hugging Face checkpoint holds, started at zero when a run's settings ask for
# it: the damped bias rule's momentum, Default MoE's expert outputs.
STATE_FROM_ZERO = ('bias_momentum', 'default_out')


def read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.isdir(hf_dir):
    raise ConfigError(f'--hf_dir={hf_dir}: no such folder')
  if not os.path.exists(path):
    raise ConfigError(f'--hf_dir={hf_dir}: holds no config.json')
  with open(path) as f:
    hf = json.load(f)
  quant = hf.get('quantization_config')
  if quant:
    raise ConfigError(f'--hf_dir={hf_dir}: the checkpoint is quantized '
                      f'({quant.get("quant_method", "?")}); quantized weights are not read: '
                      'convert a float16/bfloat16/float32 checkpoint')
  return hf


# Multimodal model types whose language model is imported: (the language model's model_type,
# when its text_config does not say; where its tensors are: a transformers name starting with
# the first string starts with the second instead).
LANGUAGE_MODEL = {'llama4': ('llama4_text', ('', 'language_model.')),
                  'aria': ('aria_text', ('', 'language_model.')),
                  'qwen3_vl_moe': ('qwen3_vl_moe_text', ('model.', 'model.language_model.')),
                  'glm4v_moe': ('glm4v_moe_text', ('model.', 'model.language_model.')),
                  'qwen3_5_moe': ('qwen3_5_moe_text', ('model.', 'model.language_model.'))}


def text_model(hf: dict) -> tuple[dict, tuple]:
  """(the language model's config, where its tensors are: (prefix, the checkpoint's prefix) or
  ()): a multimodal checkpoint of LANGUAGE_MODEL holds its language model under text_config
  (the vision tower is left out)."""
  if hf.get('model_type') in LANGUAGE_MODEL and isinstance(hf.get('text_config'), dict):
    kind, where = LANGUAGE_MODEL[hf['model_type']]
    text = hf['text_config']
    return {**text, 'model_type': text.get('model_type') or kind}, where
  return hf, ()


class _Prefixed:
  """A tensor reader of the language model inside a multimodal checkpoint: a name starting
  with `ours` is read as starting with `theirs`."""

  def __init__(self, reader, ours: str, theirs: str):
    self.reader, self.ours, self.theirs = reader, ours, theirs

  def _name(self, name):
    return self.theirs + name[len(self.ours):] if name.startswith(self.ours) else name

  def __contains__(self, name):
    return self._name(name) in self.reader

  def shape(self, name):
    return self.reader.shape(self._name(name))

  def get(self, name):
    return self.reader.get(self._name(name))


def _reader(hf_dir: str, where: tuple):
  reader = tensor_files.Reader(hf_dir)
  return _Prefixed(reader, *where) if where else reader


def _mtp_depth(hf: dict, reader, c, fields: dict) -> None:
  """DeepSeek-V3's multi-token-prediction layers (after the last layer) become model.mtp when
  the checkpoint has their weights (transformers saves none; the published one has one)."""
  depth = hf.get(families.family(hf, '').mtp_key) or 0
  if depth and f'model.layers.{hf["num_hidden_layers"]}.eh_proj.weight' in reader:
    fields['model.mtp.depth'] = depth
    set_fields(c, {'model.mtp.depth': depth})


def moejax_config(hf: dict, where: str, dtype: str = 'float32'):
  """base_config() with the checkpoint's model fields (and a model that only evaluates)."""
  c = base_config()
  fields = families.model_fields(hf, where)
  set_fields(c, fields)
  c.model.dtype = dtype
  return c, fields


def _abstract_variables(model_cfg):
  from moejax.model.transformer import Transformer
  # The training model: it also holds the multi-token-prediction modules, when there are.
  shapes = jax.eval_shape(
      lambda: Transformer(model_cfg, train=True).init(
          {'params': jax.random.key(0), 'router': jax.random.key(1)},
          jnp.zeros((1, 2 + model_cfg.mtp.depth), jnp.int32)))
  return nn.unbox(shapes)


def _paths(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _paths(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def import_variables(reader, m, fam, dtype=np.float32, interleaved: bool = False,
                     shardings: dict | None = None) -> dict:
  """The moejax variables ({'params': ..., 'moe_state': ...}) of a checkpoint, leaf by leaf;
  the selection bias stays float32. With `shardings` ({path: jax.sharding.Sharding}) each leaf
  is a jax.Array whose shards are assembled per device from the tensors they need (only this
  process's devices'); without, numpy arrays."""
  shapes = dict(_paths(_abstract_variables(m)))
  out = {}
  tied = weights.checkpoint_name(fam, 'lm_head.weight') not in reader
  for path, layers, template, to_moejax, to_hf, per_expert in weights.leaves(m, fam,
                                                                             interleaved):
    if path not in shapes:
      raise AssertionError(f'no moejax variable {path}')  # the layout table is wrong
    if path == ('params', 'head') and tied:  # tie_word_embeddings: the head is the embedding
      template = weights.checkpoint_name(fam, 'model.embed_tokens.weight')
      to_moejax, to_hf = weights._t, weights._t
    leaf_dtype = dtype if path[0] == 'params' else np.float32
    shape = shapes.pop(path).shape
    fill = functools.partial(weights.assemble, reader, m, fam, path, layers, template,
                             to_moejax, to_hf, per_expert, shape, leaf_dtype)
    _set(out, path, fill() if shardings is None else
         jax.make_array_from_callback(shape, shardings[path], _once_per_index(fill)))
  for path in [p for p in shapes if p[0] == 'moe_state' and p[-1] in STATE_FROM_ZERO]:
    # Layer state the checkpoint cannot carry, which starts at zero (a run's own settings).
    shape = shapes.pop(path).shape
    zeros = np.zeros(shape, np.float32)
    _set(out, path, zeros if shardings is None else
         jax.make_array_from_callback(shape, shardings[path], lambda i, z=zeros: z[i]))
  if shapes:
    raise AssertionError(f'variables with no source: {sorted(shapes)}')
  return out


def _once_per_index(fill):
  """The callback of jax.make_array_from_callback: devices holding the same part of a leaf
  (replicas over a data axis) share one assembled numpy array."""
  done = {}

  def part(index):
    key = tuple((s.start, s.stop, s.step) for s in index)
    if key not in done:
      done[key] = fill(index=index)
    return done[key]
  return part


def load_pretrained(hf_dir: str, dtype: str = 'float32'):
  """(model, variables) of a Hugging Face folder; model.apply(variables, ids) -> (logits,
  aux). dtype: 'float32' or 'bfloat16' (parameters and computation)."""
  from moejax.model.transformer import Transformer
  if dtype not in DTYPES:
    raise ConfigError(f'dtype={dtype!r}: one of {", ".join(DTYPES)}')
  hf, where = text_model(read_hf_config(hf_dir))
  c, _ = moejax_config(hf, f'{hf_dir}/config.json', dtype)
  fam = families.family(hf, hf_dir)
  reader = _reader(hf_dir, where)
  _mtp_depth(hf, reader, c, {})
  variables = import_variables(reader, c.model, fam, DTYPES[dtype], fam.interleaved(hf))
  return Transformer(c.model, train=False), variables


def peak_memory_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _config_file(fields: dict, hf_dir: str, hf: dict, extra: dict) -> str:
  lines = [f'"""Imported from Hugging Face: {os.path.abspath(hf_dir)} (model_type '
           f'{hf.get("model_type")}).',
           '',
           'Fine-tune: python -m moejax.main --workdir=THIS_FOLDER (this file is its config);',
           'sample: python -m moejax.generate --workdir=THIS_FOLDER.',
           '"""',
           'from moejax.config import base_config', '', '',
           'def get_config():', '  c = base_config()']
  for key, value in {**fields, **extra}.items():
    lines.append(f'  c.{key} = {value!r}')
  lines += ['  return c', '']
  return '\n'.join(lines)


def import_workdir(hf_dir: str, workdir: str, dtype: str = 'float32', log=print,
                  overrides: dict | None = None, tokenizer: str = '') -> dict:
  """Write workdir: config.py, the Hugging Face config (for export), the tokenizer (the
  folder's, or `tokenizer`: a tokenizer.json, its folder or a SentencePiece .model), and an
  Orbax checkpoint at step 0 (fresh optimizer state). overrides: dotted config fields to set
  as well (e.g. {'model.moe.router.freeze': True}), written into config.py; the model's shape
  fields come from the checkpoint. Without any tokenizer the workdir is marked so, and sampling
  or fine-tuning it is refused until one is given (its ids are not bytes)."""
  from moejax.data import tokenizer as tokenizers
  from moejax.training.checkpoint import Checkpointer
  from moejax.training.step import TrainState
  from moejax.training.workdir import open_run
  if dtype not in DTYPES:
    raise ConfigError(f'--dtype={dtype}: one of {", ".join(DTYPES)}')
  hf, inside = text_model(read_hf_config(hf_dir))
  where = f'{hf_dir}/config.json'
  c, fields = moejax_config(hf, where, dtype)
  fam = families.family(hf, where)
  if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
    raise ConfigError(f'--workdir={workdir}: exists and is not empty; import into a new folder '
                      '(nothing there was changed)')
  reader = _reader(hf_dir, inside)
  _mtp_depth(hf, reader, c, fields)
  extra = {}
  tok = None
  if tokenizer:
    tok = tokenizers.load(tokenizer)
  elif any(os.path.exists(os.path.join(hf_dir, n)) for n in ('tokenizer.json',
                                                             'tokenizer.model')):
    tok = tokenizers.from_dir(hf_dir)
  if tok is not None:
    # Validated where it is now; the workdir's copy is what config.py names.
    extra['data.tokenizer'] = tok.spec
    copied = os.path.join(os.path.abspath(workdir), 'tokenizer.json' if isinstance(
        tok, tokenizers.HFTokenizer) else 'tokenizer.model')
    if tok.vocab_size != c.model.vocab_size:
      # The embedding has more rows than the tokenizer has tokens (padding): accepted as
      # padding to a multiple of the embedding's size.
      extra['data.vocab_multiple'] = c.model.vocab_size
  # Fine-tuning defaults: a short run at a small learning rate.
  extra.update({'train.lr': 1e-4, 'train.warmup_steps': 10, 'train.steps': 100})
  shape = [k for k in (overrides or {}) if k in fields and k != 'model.dtype']
  if shape:
    raise ConfigError(f'--config.{shape[0]}: comes from the checkpoint\'s config.json and '
                      'cannot be overridden at import')
  extra.update(overrides or {})
  set_fields(c, extra)
  trainer = open_run(c).trainer
  shard = trainer.state_sharding
  first = jax.process_index() == 0
  if jax.process_count() > 1:  # every process has checked the workdir before anything is written
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('moejax.hf import: checked')
  if first:
    os.makedirs(workdir, exist_ok=True)
    if tok is not None:
      tokenizers.copy_files(tok, workdir)
  if tok is not None:
    extra['data.tokenizer'] = c.data.tokenizer = copied
  # Every device's shard of every leaf, assembled from the tensors it needs: a process never
  # holds more than its devices' shards (and one tensor), nor reads the others'.
  targets = {('params',) + p: t for p, t in _paths(shard.params)}
  targets.update(_paths(shard.model_state))
  variables = import_variables(reader, c.model, fam, interleaved=fam.interleaved(hf),
                               shardings=targets)
  params = variables.pop('params')
  with trainer.context():
    opt_state = jax.jit(trainer.tx.init, out_shardings=shard.opt_state)(params)
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
  state = TrainState(step=jax.device_put(jnp.asarray(0, jnp.int32), shard.step), params=params,
                     opt_state=opt_state, model_state=variables)
  import grain
  data_state = iter(grain.MapDataset.range(1).repeat()).get_state()  # a fresh iterator's
  ck = Checkpointer(workdir, c.train.keep_checkpoints)
  ck.save(0, state, data_state, c.to_dict())
  ck.wait()
  ck.close()
  if tok is None and first:
    log(f'warning: {hf_dir} has no tokenizer (tokenizer.json or tokenizer.model): sampling and '
        f'fine-tuning {workdir} are refused until it has one, since its ids are not bytes. '
        'Import again with --tokenizer=PATH, or copy the model\'s tokenizer.json into the '
        'workdir.')
  if first:
    with open(os.path.join(workdir, 'config.py'), 'w') as f:
      f.write(_config_file(fields, hf_dir, hf, extra))
    with open(os.path.join(workdir, tokenizers.IMPORTED_MARK), 'w') as f:
      json.dump(hf, f, indent=1)
  read, share = read_share(reader)
  report = {'parameters': n, 'peak_memory_mb': peak_memory_mb(), 'model_type': hf['model_type'],
            'bytes_read': read, 'share_read': share}
  host = f' (process {jax.process_index()} of {jax.process_count()})' * (jax.process_count() > 1)
  if inside:
    log(f'{hf_dir} is a multimodal model: its language model is imported, the rest (the vision '
        'tower and its projector) is left out')
  log(f'imported {hf_dir} ({hf["model_type"]}, {n:,} parameters) -> {workdir}{host}; read '
      f'{read / 2**20:.1f} MB of tensors ({100 * share:.2f}% of the checkpoint), peak memory '
      f'{report["peak_memory_mb"]:.0f} MB. Fine-tune: python -m moejax.main --workdir={workdir}; '
      f'sample: python -m moejax.generate --workdir={workdir}')
  return report


def read_share(reader) -> tuple[int, float]:
  """(bytes of the distinct tensors this process read, their share of all the folder's)."""
  r = reader.reader if isinstance(reader, _Prefixed) else reader
  read = sum(r.nbytes(n) for n in r.read_names)
  return read, read / max(sum(r.nbytes(n) for n in r.keys()), 1)
