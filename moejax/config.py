"""The full config schema with defaults, and its validation.

Config files under `configs/` start from `base_config()` and override fields. Every field a run
reads lives here, so `--config.x.y=v` overrides are type-checked by ml_collections and
`validate()` can check the whole thing before anything is compiled.
"""
from __future__ import annotations

import math
import os

import ml_collections


class ConfigError(ValueError):
  """A config field holds a value moejax cannot run with. The message names field and fix."""


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 258  # 256 bytes + EOS + PAD for the byte tokenizer.
  m.d_model = 128
  m.num_layers = 4
  m.num_heads = 4
  m.num_kv_heads = 2  # grouped-query attention: num_heads % num_kv_heads == 0.
  m.head_dim = 32
  m.attention = 'gqa'  # 'gqa' (grouped-query) or 'mla' (multi-head latent, DeepSeek-V2/V3).
  # gqa: RMSNorm of queries and keys before the rotation: 'none', 'head' (over each head's
  # width: Qwen3) or 'full' (over the whole projection: OLMoE); 'l2': without a scale, after
  # the rotation, on the rotated layers only (Llama 4).
  m.qk_norm = 'none'
  m.qkv_bias = False  # gqa: biases on the query, key and value projections (Qwen2).
  m.mla = mla = ml_collections.ConfigDict()
  mla.q_lora_rank = 0  # 0: queries projected directly.
  mla.kv_lora_rank = 64
  mla.qk_nope_head_dim = 32
  mla.qk_rope_head_dim = 16
  mla.v_head_dim = 32
  m.ffn_dim = 512  # width of the dense SwiGLU FFN layers.
  m.max_seq_len = 1024  # length of the RoPE table.
  m.rope_theta = 10000.0
  # Rotary frequencies stretched for long context: kind 'none' or 'llama3' (Llama 3/4: wavelengths
  # beyond original_max_len / low_freq_factor divided by factor, a smooth blend in between).
  m.rope_scaling = ml_collections.ConfigDict({'kind': 'none', 'factor': 8.0,
                                              'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                                              'original_max_len': 8192})
  # gqa: every nope_every-th layer (0: none) has no rotary embedding and attends to all earlier
  # positions; the others attend within chunks of attention_chunk positions (0: no chunks).
  # Queries of the layers without rotation are scaled by
  # 1 + nope_temperature * log(1 + floor((pos + 1) / nope_temperature_floor)) (0: off).
  # (Llama 4: 4, 8192, 0.1, 8192.)
  m.nope_every = 0
  m.attention_chunk = 0
  m.nope_temperature = 0.0
  m.nope_temperature_floor = 8192
  m.norm_eps = 1e-6
  m.tie_embeddings = False
  m.dtype = 'float32'  # activation/compute dtype; params are kept in float32.
  # Rematerialisation of each block in the backward pass: 'none' (keep every activation),
  # 'full' (keep only each block's input, recompute the rest), 'names' (keep the activations
  # named in remat_save, recompute the rest; the names are in REMAT_NAMES).
  m.remat = 'none'
  m.remat_save = ()  # with remat='names', e.g. ('attn_out', 'ffn_out').
  m.first_k_dense = 1  # the first layers use a dense FFN (DeepSeekMoE).
  m.moe_layer_freq = 1  # after those, every moe_layer_freq-th layer is MoE.

  m.mtp = mtp = ml_collections.ConfigDict()
  mtp.depth = 0  # DeepSeek-V3 multi-token prediction modules (training only); 0: off.
  mtp.loss_weight = 0.3  # lambda: loss += lambda / depth * sum of the depths' cross-entropies.

  m.moe = moe = ml_collections.ConfigDict()
  moe.num_experts = 8
  moe.num_experts_per_tok = 2
  moe.expert_ffn_dim = 128
  moe.num_shared_experts = 1
  # Width of the shared experts' fused SwiGLU; 0: num_shared_experts * expert_ffn_dim.
  moe.shared_expert_ffn_dim = 0
  # Scale the shared experts' output per token by sigmoid(x . w_gate) (Qwen2-MoE's gate).
  moe.shared_expert_gate = False
  # Apply the gate weight to the expert's input instead of its output (Llama 4: experts see
  # sigmoid(logit) * x); exact for one expert per token, so it needs num_experts_per_tok = 1.
  moe.gate_input = False
  moe.router = r = ml_collections.ConfigDict()
  r.name = 'topk'  # 'topk', 'noisy_topk', 'hash', 'sinkhorn', 'expert_choice', 'top_p', 'relu'
  # (moe/registry.py; each router reads only some of the fields below, and a field it ignores
  # may not be set). 'top_p' and 'relu' choose a variable number of experts per token, at
  # most num_experts_per_tok (the static number of routing slots).
  r.score_fn = 'softmax'  # 'softmax', or 'sigmoid' (DeepSeek-V3 affinities).
  r.norm_topk_prob = True  # False: DeepSeek-V1/V2 weights p_i; True: Mixtral/Qwen3/V3 renormalised.
  r.routed_scaling_factor = 1.0  # multiplies the gate weights (2.5 in DeepSeek-V3).
  r.dtype = 'float32'  # dtype of the router matmul; scores are always float32.
  r.jitter = 0.0  # Switch input jitter: x * U(1 - eps, 1 + eps) while training.
  r.freeze = False  # router weights get no gradient and no update (fine-tuning).
  r.num_groups = 1  # group-limited routing: experts split into groups (devices or nodes) ...
  r.topk_groups = 1  # ... and only the best topk_groups groups may be chosen.
  r.group_score = 'auto'  # 'top2_sum' (V3), 'max' (V2); auto: top2_sum for sigmoid, else max.
  r.hash_kind = 'random'  # hash router: 'random' or 'balanced' id -> expert map.
  r.hash_seed = 0
  r.sinkhorn_iters = 8  # sinkhorn router: normalisation rounds.
  r.ec_capacity_factor = 2.0  # expert choice: each expert takes C = T_scope * c / N tokens.
  r.ec_scope = 'batch'  # expert choice scope: 'batch' or 'sequence' (both non-causal).
  r.ec_eval = 'topk'  # expert choice at eval: 'topk' (causal) or 'expert_choice' (leaks).
  # topk router: zero-computation experts (MoE++) next to the N routed ones, chosen like them
  # among the K slots but computing nothing: 'zero' ones output 0, 'identity' ones the token
  # itself (times the gate); the balance losses balance all N + null_experts of them.
  r.null_experts = 0
  r.null_kind = 'zero'
  # top_p router: experts in order of probability until their sum reaches top_p (at most
  # num_experts_per_tok; the weights are the probabilities).
  r.top_p = 0.4
  moe.balance = b = ml_collections.ConfigDict()
  b.aux_loss_weight = 1e-2  # Switch/GShard alpha * N * sum f_i P_i, per MoE layer.
  # Tokens that loss averages over: 'global' (the whole batch), 'micro_batch' (each
  # data-parallel rank's share, as plain data parallelism computes it) or 'sequence'.
  b.aux_loss_scope = 'global'
  b.z_loss_weight = 1e-3  # ST-MoE router z-loss, per MoE layer.
  b.seq_aux_loss_weight = 0.0  # DeepSeek-V3 sequence-wise loss on normalised affinities.
  b.bias_update_rate = 0.0  # aux-loss-free bias step u (1e-3 in DeepSeek-V3); 0: off.
  # 'sign' (u * sign(mean - c_i)), 'proportional', 'quantile' (toward the bias that gives
  # every expert its share at this batch's score quantiles; moe/balance.py bias_update) or
  # 'damped' (proportional steps averaged with momentum bias_momentum, the bias squashed into
  # (-bias_clamp, bias_clamp) by tanh; 0: no clamp; balance.damped_update).
  b.bias_update = 'sign'
  b.bias_momentum = 0.9
  b.bias_clamp = 1.0
  # Keep a selection bias even without updates (rate 0): a fixed one, e.g. imported
  # (DeepSeek-V3's e_score_correction_bias). A rate > 0 always keeps one.
  b.selection_bias = False
  b.device_loss_weight = 0.0  # DeepSeekMoE device-level balance loss (a2).
  b.comm_loss_weight = 0.0  # DeepSeek-V2 communication balance loss (a3).
  b.num_devices = 0  # expert groups for the two above; 0: the mesh's expert axis size.
  b.importance_loss_weight = 0.0  # Shazeer 2017: CV(sum_t gates)^2.
  b.load_loss_weight = 0.0  # Shazeer 2017: CV(load)^2 (smooth load with the noisy router).
  b.entropy_loss_weight = 0.0  # top-p routing's dynamic loss: mean router entropy (1e-4).
  # relu router (ReMoE): the L1 penalty on the ReLU gates steers the mean number of active
  # experts per token to l1_target (> 0 turns it on) with an adaptive coefficient,
  # lambda <- lambda * l1_growth^sign(target sparsity - sparsity), from l1_init.
  b.l1_target = 0.0
  b.l1_init = 1e-8
  b.l1_growth = 1.2
  moe.dispatch = d = ml_collections.ConfigDict()
  d.name = 'dropless'  # 'capacity' (indexed, token dropping), 'einsum' (GShard one-hot, token
  # dropping, per group of group_size tokens), 'all_to_all' (capacity per device, shard_map
  # all-to-all over the expert mesh axis), 'dropless', 'ring' (dropless expert parallelism:
  # tokens all-gathered along the expert axis, outputs reduce-scattered back), or
  # 'ragged_all_to_all' (dropless, exact-size exchanges; TPU/GPU only).
  d.group_size = 512  # einsum path: tokens per group (capacity is per group); divides the batch.
  d.capacity_factor = 1.25  # C = ceil(capacity_factor * K * T / N), K included (MaxText).
  d.eval_capacity_factor = 2.0
  d.min_capacity = 4
  d.priority = 'choice'  # capacity drop order: 'choice' (all top-1 first), 'position' or
  # 'probability' (highest router weight first).
  moe.experts = ex = ml_collections.ConfigDict()
  ex.name = 'swiglu'  # the routed expert block (moe/registry.py EXPERTS): 'swiglu' or 'mlp'
  # (two matrices, no gate: act(x W_in) W_out, Switch/GShard's experts).
  ex.activation = 'gelu'  # mlp: 'gelu' or 'relu'.
  ex.backend = 'auto'  # its dropless kernels: 'auto' (blocked on CPU, else ragged_dot),
  # 'ragged_dot' or 'blocked'.
  # Rows per block of the 'blocked' backend; 0: the mean rows per expert (T*K/N) rounded up to
  # a power of two, at most 2^16 / d_model rows, at least 16 (moe/blocked.py auto_block).
  ex.block_size = 0

  c.data = dt = ml_collections.ConfigDict()
  # 'stdlib' (Python's own library sources), 'files' (data.paths) or 'prepared' (token shards
  # made by python -m moejax.prepare). The first two are read and tokenized in memory at start.
  dt.source = 'stdlib'
  dt.paths = ''  # for source='files': comma-separated text files or folders.
  dt.file_glob = '*.py'  # files taken from folders (and from the stdlib).
  dt.val_percent = 5  # share of files (not bytes) that go to validation, chosen by path hash.
  dt.max_bytes = 0  # cap on the training text in bytes (0: no cap); for quick tests.
  # For 'stdlib' and 'files': 'bytes', a tokenizer.json (or its folder) or a SentencePiece
  # .model file. A prepared corpus brings its own.
  dt.tokenizer = 'bytes'
  dt.prepared_dir = ''  # for source='prepared': the folder python -m moejax.prepare wrote.
  # For source='prepared', instead of prepared_dir: several prepared folders sampled by weight,
  # 'DIR=WEIGHT,DIR=WEIGHT' (one tokenizer); each one's validation split is evaluated by name.
  dt.mixture = ''
  # Further evaluation sets, 'NAME=DIR,...': the validation splits of prepared folders.
  dt.eval_sets = ''
  # model.vocab_size is the tokenizer's size or that size padded up to this multiple (e.g. 128:
  # accelerators prefer matmul sizes in multiples of 128; the padded ids are never seen).
  dt.vocab_multiple = 1
  dt.seq_len = 128

  c.train = t = ml_collections.ConfigDict()
  t.steps = 300
  t.batch_size = 16  # global batch, in sequences.
  t.lr = 3e-3
  t.warmup_steps = 30
  t.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio.
  t.weight_decay = 0.1
  t.b1 = 0.9
  t.b2 = 0.95
  t.grad_clip = 1.0
  t.log_every = 10
  t.eval_every = 100
  t.eval_batches = 8
  t.checkpoint_every = 100
  t.keep_checkpoints = 3
  t.progress = True
  t.stop_after = 0  # stop (with a checkpoint) after this step, as if preempted; 0: never.
  # Divergence guard: a step whose loss, gradient norm or new parameters are not finite is never
  # applied (checked on device). Then 'stop' ends the run with exit code 3 naming the step (the
  # default: a diverged run is a result to see, not to paper over); 'skip' drops that batch's
  # update and goes on; 'rollback' restores the last checkpoint and skips every batch from it
  # up to the bad one (PaLM's remedy for loss spikes).
  t.nonfinite = 'stop'
  t.max_nonfinite = 5  # skip: bad steps in a row; rollback: rollbacks without a new checkpoint.

  # Mesh axis sizes; -1 takes the devices the others leave. Product must equal the devices.
  c.mesh = ms = ml_collections.ConfigDict()
  ms.data = -1
  ms.fsdp = 1
  ms.expert = 1
  ms.tensor = 1
  return c


def from_dict(d: dict) -> ml_collections.ConfigDict:
  """A saved config (e.g. from a checkpoint) on top of today's defaults, so fields added since
  it was written take their default values."""
  c = base_config()
  _merge(c, d)
  return c


def field_names(config, prefix: str = '') -> list[str]:
  """Every leaf field of a config, dotted."""
  out = []
  for k, v in config.items():
    name = f'{prefix}{k}'
    out += field_names(v, name + '.') if isinstance(v, ml_collections.ConfigDict) else [name]
  return out


def field_parent(config, key: str, what: str = 'override'):
  """(section node, last name) of the leaf field `key` ('train.steps'); an unknown field is a
  ConfigError naming the closest existing one."""
  *path, last = key.split('.')
  node = config
  for part in path:
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise _unknown(key, config, what)
    node = node[part]
  if last not in node or isinstance(node[last], ml_collections.ConfigDict):
    raise _unknown(key, config, what)
  return node, last


def _unknown(key: str, config, what: str) -> ConfigError:
  import difflib
  names = field_names(config)
  close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
  if not close:  # a typo in the last part: compare with the fields of the same section
    section = key.rpartition('.')[0]
    near = [n for n in names if n.rpartition('.')[0] == section]
    close = difflib.get_close_matches(key, near, n=1, cutoff=0.5)
  hint = f'; did you mean config.{close[0]}?' if close else (
      '; the fields are listed by --print_config')
  return ConfigError(f'{what}: config has no field {key!r}{hint}')


def set_fields(config, overrides: dict):
  """Set dotted fields, e.g. {'model.moe.num_experts': 16}; an unknown field is an error."""
  for key, value in overrides.items():
    node, last = field_parent(config, key, f'override {key!r}')
    node[last] = value
  return config


def _merge(node, d: dict):
  for k, v in d.items():
    if k in node and isinstance(node[k], ml_collections.ConfigDict) and isinstance(v, dict):
      _merge(node[k], v)
    else:
      node[k] = v


EC_SCOPES = ('batch', 'sequence')
EC_EVALS = ('topk', 'expert_choice')
SCORE_FNS = ('softmax', 'sigmoid')
GROUP_SCORES = ('auto', 'top2_sum', 'max')
HASH_KINDS = ('random', 'balanced')
BIAS_UPDATES = ('sign', 'proportional', 'quantile', 'damped')
LOSS_SCOPES = ('global', 'micro_batch', 'sequence')
REMAT = ('none', 'full', 'names')
# Activations tagged with jax.ad_checkpoint.checkpoint_name, which remat='names' can keep:
# a block's normed attention input, its query/key/value projections (GQA; MLA: the query and
# the key-value latent), the attention output, the normed FFN input, the dense SwiGLU hidden
# activation, and the FFN (dense or MoE) output.
REMAT_NAMES = ('attn_in', 'query_proj', 'key_proj', 'value_proj', 'kv_latent', 'attn_out',
               'ffn_in', 'ffn_hidden', 'ffn_out')
DROPLESS_BACKENDS = ('auto', 'ragged_dot', 'blocked')
PRIORITIES = ('choice', 'position', 'probability')
DTYPES = ('float32', 'bfloat16')
QK_NORMS = ('none', 'head', 'full', 'l2')
ROPE_SCALINGS = ('none', 'llama3')
NONFINITE = ('stop', 'skip', 'rollback')
MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')


def _fail(field: str, value, fix: str):
  raise ConfigError(f'config.{field}={value!r}: {fix}')


def _positive(c, fields: str, allow_zero: bool = False):
  for f in fields.split():
    v = _get(c, f)
    if not isinstance(v, (int, float)) or v < 0 or (v == 0 and not allow_zero):
      _fail(f, v, 'must be a positive number' if not allow_zero else 'must be >= 0')


def _finite(c, prefix: str = ''):
  """NaN and inf pass every comparison check (NaN < 0 is False), so refuse them everywhere."""
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      _finite(v, f'{prefix}{k}.')
    elif isinstance(v, float) and not math.isfinite(v):
      _fail(f'{prefix}{k}', v, 'must be a finite number')


def _get(c, dotted: str):
  for part in dotted.split('.'):
    c = c[part]
  return c


def _one_of(c, field: str, choices):
  v = _get(c, field)
  if v not in choices:
    _fail(field, v, f'must be one of {list(choices)}')


def mesh_shape(c, num_devices: int) -> dict[str, int]:
  """Resolve the -1 axis and check that the mesh covers exactly the devices."""
  sizes = {a: int(c.mesh[a]) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  for a, s in sizes.items():
    if s == 0 or s < -1:
      _fail(f'mesh.{a}', s, 'must be a positive axis size, or -1 to take the remaining devices')
  if len(free) > 1:
    _fail(f'mesh.{free[1]}', -1, f'only one mesh axis may be -1 (also -1: mesh.{free[0]})')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      _fail(f'mesh.{free[0]}', -1, f'the other axes multiply to {fixed}, which does not divide '
            f'the {num_devices} devices; change them so their product divides {num_devices}')
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    _fail('mesh', dict(sizes), f'the axis sizes multiply to {math.prod(sizes.values())} but '
          f'there are {num_devices} devices; make the product {num_devices} (or set one axis to -1)')
  return sizes


def moe_layer_ids(m) -> list[int]:
  """Layers with a MoE FFN: after first_k_dense, every moe_layer_freq-th layer."""
  return [i for i in range(m.num_layers)
          if i >= m.first_k_dense and (i - m.first_k_dense) % m.moe_layer_freq == 0]


def validate(c, num_devices: int) -> dict[str, int]:
  """Check the whole config before anything is built; return the resolved mesh shape."""
  m, moe, t, dt = c.model, c.model.moe, c.train, c.data
  _finite(c)
  _positive(c, 'model.vocab_size model.d_model model.num_layers model.num_heads '
            'model.num_kv_heads model.head_dim model.ffn_dim model.max_seq_len '
            'model.rope_theta model.norm_eps model.moe_layer_freq '
            'data.seq_len train.steps train.batch_size train.lr train.log_every '
            'train.eval_every train.checkpoint_every train.keep_checkpoints data.vocab_multiple')
  _positive(c, 'model.first_k_dense train.warmup_steps train.weight_decay train.grad_clip '
            'data.max_bytes train.stop_after train.eval_batches', allow_zero=True)
  if dt.source != 'prepared' and dt.tokenizer == 'bytes' and m.vocab_size < 258:
    _fail('model.vocab_size', m.vocab_size, 'the byte tokenizer needs at least 258 (256 bytes, '
          'EOS, PAD)')
  if m.num_heads % m.num_kv_heads:
    _fail('model.num_kv_heads', m.num_kv_heads,
          f'must divide model.num_heads={m.num_heads} (grouped-query attention)')
  if m.head_dim % 2:
    _fail('model.head_dim', m.head_dim, 'must be even for rotary embeddings')
  if dt.seq_len > m.max_seq_len:
    _fail('data.seq_len', dt.seq_len, f'exceeds the RoPE table model.max_seq_len='
          f'{m.max_seq_len}; lower data.seq_len or raise model.max_seq_len')
  if not 0 < dt.val_percent < 100:
    _fail('data.val_percent', dt.val_percent, 'must be between 0 and 100 (exclusive)')
  if not 0 <= t.min_lr_ratio <= 1:
    _fail('train.min_lr_ratio', t.min_lr_ratio, 'must be in [0, 1]')
  if t.warmup_steps >= t.steps:
    _fail('train.warmup_steps', t.warmup_steps, f'must be below train.steps={t.steps}')
  _one_of(c, 'model.dtype', DTYPES)
  _one_of(c, 'model.remat', REMAT)
  if m.remat == 'names':
    unknown = [n for n in m.remat_save if n not in REMAT_NAMES]
    if unknown or not m.remat_save:
      _fail('model.remat_save', m.remat_save, f"remat='names' keeps these activations; name "
            f"one or more of {', '.join(REMAT_NAMES)}")
  elif m.remat_save:
    _fail('model.remat_save', m.remat_save, f"is used only with model.remat='names' (it is "
          f"{m.remat!r}); set model.remat='names' or leave remat_save empty")
  _one_of(c, 'train.nonfinite', NONFINITE)
  _positive(c, 'train.max_nonfinite')
  _one_of(c, 'model.attention', ('gqa', 'mla'))
  _one_of(c, 'model.qk_norm', QK_NORMS)
  _one_of(c, 'model.rope_scaling.kind', ROPE_SCALINGS)
  _positive(c, 'model.rope_scaling.factor model.rope_scaling.low_freq_factor '
            'model.rope_scaling.high_freq_factor model.rope_scaling.original_max_len '
            'model.nope_temperature_floor')
  _positive(c, 'model.nope_every model.attention_chunk model.nope_temperature', allow_zero=True)
  if m.rope_scaling.kind == 'llama3' and not (
      m.rope_scaling.high_freq_factor >= m.rope_scaling.low_freq_factor):
    _fail('model.rope_scaling.high_freq_factor', m.rope_scaling.high_freq_factor,
          f'must be at least low_freq_factor={m.rope_scaling.low_freq_factor}')
  if m.attention == 'mla' and (m.nope_every or m.attention_chunk or
                               m.rope_scaling.kind != 'none'):
    _fail('model.attention', m.attention, 'MLA has no NoPE layers, attention chunks or rotary '
          "scaling; set model.nope_every=0, attention_chunk=0, rope_scaling.kind='none'")
  if m.attention == 'mla' and m.qkv_bias:
    _fail('model.qkv_bias', m.qkv_bias, "applies to attention='gqa'; set it to False")
  if m.attention == 'mla' and m.qk_norm != 'none':
    _fail('model.qk_norm', m.qk_norm, "applies to attention='gqa' (MLA normalises its own "
          "latents); set it to 'none'")
  _positive(c, 'model.mtp.depth model.mtp.loss_weight', allow_zero=True)
  if m.mtp.depth >= dt.seq_len:
    _fail('model.mtp.depth', m.mtp.depth, f'must be below data.seq_len={dt.seq_len}')
  if m.attention == 'mla':
    _positive(c, 'model.mla.kv_lora_rank model.mla.qk_nope_head_dim model.mla.qk_rope_head_dim '
              'model.mla.v_head_dim')
    _positive(c, 'model.mla.q_lora_rank', allow_zero=True)
    if m.mla.qk_rope_head_dim % 2:
      _fail('model.mla.qk_rope_head_dim', m.mla.qk_rope_head_dim, 'must be even for rotary '
            'embeddings')

  has_moe = bool(moe_layer_ids(m))
  if has_moe:
    _positive(c, 'model.moe.num_experts model.moe.num_experts_per_tok model.moe.expert_ffn_dim '
              'model.moe.dispatch.capacity_factor model.moe.dispatch.eval_capacity_factor')
    _positive(c, 'model.moe.num_shared_experts model.moe.shared_expert_ffn_dim '
              'model.moe.dispatch.min_capacity '
              'model.moe.balance.aux_loss_weight model.moe.balance.z_loss_weight',
              allow_zero=True)
    if moe.num_experts_per_tok > moe.num_experts:
      _fail('model.moe.num_experts_per_tok', moe.num_experts_per_tok,
            f'top-{moe.num_experts_per_tok} of model.moe.num_experts={moe.num_experts} experts '
            f'is impossible; use at most {moe.num_experts}')
    _positive(c, 'model.moe.router.num_groups model.moe.router.topk_groups '
              'model.moe.router.routed_scaling_factor')
    _positive(c, 'model.moe.router.jitter model.moe.balance.seq_aux_loss_weight '
              'model.moe.balance.bias_update_rate model.moe.balance.device_loss_weight '
              'model.moe.balance.comm_loss_weight model.moe.balance.num_devices '
              'model.moe.balance.importance_loss_weight model.moe.balance.load_loss_weight '
              'model.moe.balance.entropy_loss_weight model.moe.balance.l1_target',
              allow_zero=True)
    _positive(c, 'model.moe.router.sinkhorn_iters model.moe.router.ec_capacity_factor')
    _one_of(c, 'model.moe.router.ec_scope', EC_SCOPES)
    _one_of(c, 'model.moe.router.ec_eval', EC_EVALS)
    groups = moe.balance.num_devices
    if groups and moe.num_experts % groups:
      _fail('model.moe.balance.num_devices', groups,
            f'must divide model.moe.num_experts={moe.num_experts}')
    _one_of(c, 'model.moe.router.group_score', GROUP_SCORES)
    _one_of(c, 'model.moe.router.hash_kind', HASH_KINDS)
    _one_of(c, 'model.moe.balance.bias_update', BIAS_UPDATES)
    if not 0 <= moe.balance.bias_momentum < 1:
      _fail('model.moe.balance.bias_momentum', moe.balance.bias_momentum, 'must be in [0, 1)')
    _positive(c, 'model.moe.balance.bias_clamp', allow_zero=True)
    _one_of(c, 'model.moe.balance.aux_loss_scope', LOSS_SCOPES)
    _one_of(c, 'model.moe.router.score_fn', SCORE_FNS)
    _one_of(c, 'model.moe.router.dtype', DTYPES)
    _one_of(c, 'model.moe.dispatch.priority', PRIORITIES)
    _one_of(c, 'model.moe.experts.backend', DROPLESS_BACKENDS)
    _positive(c, 'model.moe.experts.block_size', allow_zero=True)
    if moe.gate_input and moe.num_experts_per_tok != 1:
      _fail('model.moe.gate_input', moe.gate_input, 'gates the input of the one expert a token '
            f'uses, so it needs model.moe.num_experts_per_tok=1 (it is '
            f'{moe.num_experts_per_tok})')
    # The pieces' own contracts: names, their checks, and no setting they ignore.
    from moejax.moe import registry
    registry.check(c, _fail, base_config().model.moe)

  _check_data(dt, _fail)

  sizes = mesh_shape(c, num_devices)
  if has_moe and moe.num_experts % sizes['expert']:
    _fail('mesh.expert', sizes['expert'], f'must divide model.moe.num_experts='
          f'{moe.num_experts}; pick an expert axis size that divides it')
  for field, n in (('model.num_heads', m.num_heads), ('model.num_kv_heads', m.num_kv_heads)):
    if n % sizes['tensor']:
      _fail('mesh.tensor', sizes['tensor'], f'must divide {field}={n}')
  batch_shards = sizes['data'] * sizes['fsdp'] * sizes['expert']
  if t.batch_size % batch_shards:
    _fail('train.batch_size', t.batch_size, f'must be divisible by mesh data*fsdp*expert='
          f'{batch_shards}, over which the batch is split')
  return sizes


# The data fields each source reads (besides data.seq_len and data.vocab_multiple).
DATA_SOURCES = {'stdlib': ('file_glob', 'val_percent', 'max_bytes', 'tokenizer'),
                'files': ('paths', 'file_glob', 'val_percent', 'max_bytes', 'tokenizer'),
                'prepared': ('prepared_dir', 'mixture', 'eval_sets')}


def _check_data(dt, fail) -> None:
  if dt.source not in DATA_SOURCES:
    fail('data.source', dt.source, f"must be one of {', '.join(DATA_SOURCES)}")
  defaults = base_config().data
  for field in sorted({f for fields in DATA_SOURCES.values() for f in fields}):
    if field not in DATA_SOURCES[dt.source] and dt[field] != defaults[field]:
      readers = [s for s, fields in DATA_SOURCES.items() if field in fields]
      fail(f'data.{field}', dt[field], f"is not read by data.source={dt.source!r} (only by "
           f"{' and '.join(repr(r) for r in readers)}); remove it or change data.source")
  if dt.source == 'files':
    if not dt.paths:
      fail('data.paths', dt.paths, "data.source='files' needs comma-separated paths")
    for p in dt.paths.split(','):
      if not os.path.exists(p):
        fail('data.paths', p, 'this path does not exist; point it at text files or folders')
  if dt.source == 'prepared' and bool(dt.prepared_dir) == bool(dt.mixture):
    fail('data.prepared_dir', dt.prepared_dir, "data.source='prepared' reads one of "
         'data.prepared_dir (one corpus) and data.mixture (several); set exactly one')
  if dt.source != 'prepared' and dt.tokenizer != 'bytes' and not os.path.exists(dt.tokenizer):
    fail('data.tokenizer', dt.tokenizer, "no such file; give 'bytes', a tokenizer.json (or its "
         'folder) or a SentencePiece .model file')


def routing_is_causal(m, train: bool) -> bool:
  """Whether a token's routed output can depend on later tokens of the batch (each router and
  dispatcher declares its own causality; moe/registry.py combines them). E.g. expert choice
  (unless evaluated as token-choice top-K), Sinkhorn in training, and capacity dispatch that
  serves all first choices before second choices, or the highest router weights first."""
  if not moe_layer_ids(m):
    return True
  from moejax.moe import registry
  return registry.routing_is_causal(m.moe, train)
