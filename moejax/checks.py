"""validate(): the whole config checked before anything is built or compiled.

The generic checks are here (numbers that must be positive, the model's shape, the schedule,
training); each piece checks its own fields (moe/registry.check: routers, dispatchers, expert
blocks, balance, kernels; data/sources.check: the data source), and the mesh is resolved by
parallel/mesh. A failed check raises ConfigError naming the field and the fix.
"""
from __future__ import annotations

import math

import ml_collections

from moejax.config import base_config, get_field
from moejax.data import sources
from moejax.errors import ConfigError
from moejax.model import schedule
from moejax.model.remat import REMAT, REMAT_NAMES
from moejax.moe import registry
from moejax.parallel.mesh import mesh_shape
from moejax.training.guard import NONFINITE

DTYPES = ('float32', 'bfloat16')
QK_NORMS = ('none', 'head', 'full', 'l2')
ROPE_SCALINGS = ('none', 'llama3', 'yarn', 'longrope')
# The gqa-only attention features and the value that turns each off (MLA has none of them).
GQA_ONLY = (('nope_every', 0), ('attention_chunk', 0), ('rotary_dim', 0), ('sliding_window', 0),
            ('attention_sinks', False), ('attention_out_bias', False),
            ('attention_output_gate', False), ('qkv_bias', False), ('attention_scale', 0.0),
            ('qk_norm_after_rope', False), ('rope_layers', 'all'))


def fail(field: str, value, fix: str):
  """Raise the one-line error of a config field: config.FIELD=VALUE: FIX."""
  raise ConfigError(f'config.{field}={value!r}: {fix}')


def _positive(c, fields: str, allow_zero: bool = False):
  for f in fields.split():
    v = get_field(c, f)
    if not isinstance(v, (int, float)) or v < 0 or (v == 0 and not allow_zero):
      fail(f, v, 'must be a positive number' if not allow_zero else 'must be >= 0')


def _finite(c, prefix: str = ''):
  """NaN and inf pass every comparison check (NaN < 0 is False), so refuse them everywhere."""
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      _finite(v, f'{prefix}{k}.')
    elif isinstance(v, float) and not math.isfinite(v):
      fail(f'{prefix}{k}', v, 'must be a finite number')


def _one_of(c, field: str, choices):
  v = get_field(c, field)
  if v not in choices:
    fail(field, v, f'must be one of {list(choices)}')


def validate(c, num_devices: int) -> dict[str, int]:
  """Check the whole config before anything is built.

  Args:
    c: the run's config (base_config() with fields changed).
    num_devices: the devices the mesh must cover.
  Returns:
    the resolved mesh shape {axis: size}.
  Raises:
    ConfigError naming the first field that cannot run, and the fix.
  """
  _finite(c)
  _check_model(c)
  _check_train(c)
  if schedule.has_moe(c.model):
    _check_moe(c)
  sources.check(c.data, fail)
  sizes = mesh_shape(c.mesh, num_devices)
  _check_mesh(c, sizes)
  return sizes


def _check_model(c):
  m, dt = c.model, c.data
  _positive(c, 'model.vocab_size model.d_model model.num_layers model.num_heads '
            'model.num_kv_heads model.head_dim model.ffn_dim model.max_seq_len '
            'model.rope_theta model.norm_eps model.moe_layer_freq data.seq_len '
            'data.vocab_multiple')
  _positive(c, 'model.first_k_dense data.max_bytes', allow_zero=True)
  if dt.source != 'prepared' and dt.tokenizer == 'bytes' and m.vocab_size < 258:
    fail('model.vocab_size', m.vocab_size, 'the byte tokenizer needs at least 258 (256 bytes, '
         'EOS, PAD)')
  if m.num_heads % m.num_kv_heads:
    fail('model.num_kv_heads', m.num_kv_heads,
         f'must divide model.num_heads={m.num_heads} (grouped-query attention)')
  if m.head_dim % 2:
    fail('model.head_dim', m.head_dim, 'must be even for rotary embeddings')
  if dt.seq_len > m.max_seq_len:
    fail('data.seq_len', dt.seq_len, f'exceeds the RoPE table model.max_seq_len='
         f'{m.max_seq_len}; lower data.seq_len or raise model.max_seq_len')
  _one_of(c, 'model.dtype', DTYPES)
  _one_of(c, 'model.remat', REMAT)
  if m.remat == 'names':
    unknown = [n for n in m.remat_save if n not in REMAT_NAMES]
    if unknown or not m.remat_save:
      fail('model.remat_save', m.remat_save, f"remat='names' keeps these activations; name "
           f"one or more of {', '.join(REMAT_NAMES)}")
  elif m.remat_save:
    fail('model.remat_save', m.remat_save, f"is used only with model.remat='names' (it is "
         f"{m.remat!r}); set model.remat='names' or leave remat_save empty")
  _one_of(c, 'model.norm', ('rms', 'layer'))
  _one_of(c, 'model.norm_placement', ('pre', 'post', 'both'))
  _positive(c, 'model.embedding_multiplier model.residual_multiplier model.logit_divisor')
  _positive(c, 'model.attention_scale', allow_zero=True)
  _one_of(c, 'model.attention', ('gqa', 'mla'))
  _one_of(c, 'model.qk_norm', QK_NORMS)
  _one_of(c, 'model.rope_layers', ('all', 'windowed'))
  _one_of(c, 'model.rope_scaling.kind', ROPE_SCALINGS)
  _positive(c, 'model.rope_scaling.factor model.rope_scaling.low_freq_factor '
            'model.rope_scaling.high_freq_factor model.rope_scaling.original_max_len '
            'model.nope_temperature_floor')
  _positive(c, 'model.nope_every model.attention_chunk model.nope_temperature', allow_zero=True)
  if m.rope_scaling.kind == 'llama3' and not (
      m.rope_scaling.high_freq_factor >= m.rope_scaling.low_freq_factor):
    fail('model.rope_scaling.high_freq_factor', m.rope_scaling.high_freq_factor,
         f'must be at least low_freq_factor={m.rope_scaling.low_freq_factor}')
  _positive(c, 'model.rope_scaling.beta_fast model.rope_scaling.beta_slow')
  _positive(c, 'model.rope_scaling.attention_factor model.rotary_dim model.sliding_window',
            allow_zero=True)
  r = m.rope_scaling
  if r.kind == 'longrope':
    half = (m.rotary_dim or m.head_dim) // 2
    for field in ('short_factor', 'long_factor'):
      values = r[field]
      if (not isinstance(values, (tuple, list)) or len(values) != half or
          not all(isinstance(v, (int, float)) and v > 0 for v in values)):
        fail(f'model.rope_scaling.{field}', values, f'longrope needs {half} positive numbers, '
             'one per rotary frequency (rotary_dim or head_dim, halved)')
  if m.qk_norm_after_rope and m.qk_norm not in ('head', 'full'):
    fail('model.qk_norm_after_rope', m.qk_norm_after_rope, "moves the 'head' or 'full' q/k "
         f"norm after the rotation; model.qk_norm is {m.qk_norm!r}")
  if m.head_bias and m.tie_embeddings:
    fail('model.head_bias', m.head_bias, 'is a bias of the untied output head; set '
         'model.tie_embeddings=False or head_bias=False')
  if m.rotary_dim % 2 or m.rotary_dim > m.head_dim:
    fail('model.rotary_dim', m.rotary_dim, f'must be even and at most model.head_dim='
         f'{m.head_dim} (0: rotate the whole head)')
  pattern = m.sliding_pattern
  if (not isinstance(pattern, (tuple, list)) or not pattern or
      any(p not in (0, 1) or isinstance(p, float) for p in pattern)):
    fail('model.sliding_pattern', pattern, 'must be a non-empty tuple of 0 and 1 (1: the layer '
         'attends within model.sliding_window), repeated over the layers, e.g. (1, 0)')
  _linear_layers(c)
  if m.attention == 'mla':
    if m.rope_scaling.kind != 'none':
      fail('model.rope_scaling.kind', m.rope_scaling.kind, "MLA has no rotary scaling; set it "
           "to 'none'")
    for field, off in GQA_ONLY:
      if m[field] != off:
        fail(f'model.{field}', m[field], f"applies to attention='gqa'; set it to {off!r}")
  if m.attention == 'mla' and m.qk_norm != 'none':
    fail('model.qk_norm', m.qk_norm, "applies to attention='gqa' (MLA normalises its own "
         "latents); set it to 'none'")
  _positive(c, 'model.mtp.depth model.mtp.loss_weight', allow_zero=True)
  if m.mtp.depth >= dt.seq_len:
    fail('model.mtp.depth', m.mtp.depth, f'must be below data.seq_len={dt.seq_len}')
  if m.attention == 'mla':
    _positive(c, 'model.mla.kv_lora_rank model.mla.qk_nope_head_dim model.mla.qk_rope_head_dim '
              'model.mla.v_head_dim model.mla.latent_norm_eps')
    _positive(c, 'model.mla.q_lora_rank', allow_zero=True)
    if m.mla.qk_rope_head_dim % 2:
      fail('model.mla.qk_rope_head_dim', m.mla.qk_rope_head_dim, 'must be even for rotary '
           'embeddings')
    _sparse_attention(c, m.mla)


def _sparse_attention(c, mla):
  """model.mla.index_*: the lightning indexer of DeepSeek Sparse Attention."""
  _positive(c, 'model.mla.index_topk model.mla.index_loss_weight', allow_zero=True)
  if not mla.index_topk:
    return
  if not mla.q_lora_rank:
    fail('model.mla.index_topk', mla.index_topk, 'needs model.mla.q_lora_rank > 0 (the indexer '
         "reads the queries' latent); set q_lora_rank or index_topk=0")
  _positive(c, 'model.mla.index_heads model.mla.index_head_dim')
  if mla.index_head_dim < mla.qk_rope_head_dim:
    fail('model.mla.index_head_dim', mla.index_head_dim, 'must be at least '
         f'model.mla.qk_rope_head_dim={mla.qk_rope_head_dim} (its first dims rotate)')


def _check_train(c):
  t = c.train
  _positive(c, 'train.steps train.batch_size train.lr train.log_every train.eval_every '
            'train.checkpoint_every train.keep_checkpoints train.max_nonfinite')
  _positive(c, 'train.warmup_steps train.weight_decay train.grad_clip train.stop_after '
            'train.eval_batches train.peak_tflops', allow_zero=True)
  if not (isinstance(t.final_eval_batches, int) and t.final_eval_batches >= -1):
    fail('train.final_eval_batches', t.final_eval_batches, 'must be -1 (no final evaluation), '
         '0 (the whole validation split) or a number of batches')
  if not 0 < c.data.val_percent < 100:
    fail('data.val_percent', c.data.val_percent, 'must be between 0 and 100 (exclusive)')
  if not 0 <= t.min_lr_ratio <= 1:
    fail('train.min_lr_ratio', t.min_lr_ratio, 'must be in [0, 1]')
  if t.warmup_steps >= t.steps:
    fail('train.warmup_steps', t.warmup_steps, f'must be below train.steps={t.steps}; set it '
         f'with the steps, e.g. --config.train.warmup_steps={t.steps // 10}')
  _one_of(c, 'train.nonfinite', NONFINITE)
  from moejax.training import wandb_writer
  wandb_writer.check(c)


def _check_moe(c):
  moe = c.model.moe
  _positive(c, 'model.moe.num_experts model.moe.num_experts_per_tok model.moe.expert_ffn_dim')
  _positive(c, 'model.moe.num_shared_experts model.moe.shared_expert_ffn_dim', allow_zero=True)
  # Every loss weight (moe/losses.py) and every other number of the balance section.
  _positive(c, ' '.join(f'model.moe.balance.{k}' for k, v in moe.balance.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)),
            allow_zero=True)
  if moe.num_experts_per_tok > moe.num_experts:
    fail('model.moe.num_experts_per_tok', moe.num_experts_per_tok,
         f'top-{moe.num_experts_per_tok} of model.moe.num_experts={moe.num_experts} experts '
         f'is impossible; use at most {moe.num_experts}')
  if moe.gate_input and moe.num_experts_per_tok != 1:
    fail('model.moe.gate_input', moe.gate_input, 'gates the input of the one expert a token '
         f'uses, so it needs model.moe.num_experts_per_tok=1 (it is '
         f'{moe.num_experts_per_tok})')
  # The pieces' own contracts: names, their checks, and no setting they ignore.
  registry.check(c, fail, base_config().model.moe)


def _check_mesh(c, sizes):
  m, moe, t = c.model, c.model.moe, c.train
  if schedule.has_moe(m) and moe.num_experts % sizes['expert']:
    fail('mesh.expert', sizes['expert'], f'must divide model.moe.num_experts='
         f'{moe.num_experts}; pick an expert axis size that divides it')
  for field, n in (('model.num_heads', m.num_heads), ('model.num_kv_heads', m.num_kv_heads)):
    if n % sizes['tensor']:
      fail('mesh.tensor', sizes['tensor'], f'must divide {field}={n}')
  batch_shards = sizes['data'] * sizes['fsdp'] * sizes['expert']
  if t.batch_size % batch_shards:
    fail('train.batch_size', t.batch_size, f'must be divisible by mesh data*fsdp*expert='
         f'{batch_shards}, over which the batch is split')


def _linear_layers(c):
  """model.linear_pattern and, when it has a linear layer, model.linear."""
  m = c.model
  pattern = m.linear_pattern
  if (not isinstance(pattern, (tuple, list)) or
      any(p not in (0, 1) or isinstance(p, float) for p in pattern)):
    fail('model.linear_pattern', pattern, 'must be a tuple of 0 and 1 (1: a Gated DeltaNet '
         'layer), repeated over the layers, e.g. (1, 1, 1, 0); () for none')
  if not any(pattern):
    return
  if min(m.first_k_dense, m.num_layers) % len(pattern):
    fail('model.first_k_dense', m.first_k_dense, f'must be a multiple of '
         f'len(model.linear_pattern)={len(pattern)} (the dense layers are scanned in whole '
         'repeats of the pattern)')
  for field in ('num_key_heads', 'num_value_heads', 'key_head_dim', 'value_head_dim',
                'conv_kernel', 'chunk'):
    value = m.linear[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      fail(f'model.linear.{field}', value, 'must be a positive integer')
  _one_of(c, 'model.linear.decay', ('head', 'channel'))
  _one_of(c, 'model.linear.gate_fn', ('silu', 'sigmoid'))
  _positive(c, 'model.linear.gate_rank', allow_zero=True)
  if m.linear.num_value_heads % m.linear.num_key_heads:
    fail('model.linear.num_value_heads', m.linear.num_value_heads, 'must be a multiple of '
         f'model.linear.num_key_heads={m.linear.num_key_heads}')
