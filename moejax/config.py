"""The config schema: every field a run reads, with its default and meaning, and the helpers
that read and set fields by their dotted names.

Config files under `configs/` start from `base_config()` and override fields. Every field lives
here, so `--config.x.y=v` overrides are type-checked by ml_collections; `moejax.checks.validate`
checks the whole config before anything is compiled, and each piece (router, dispatcher, expert
block, loss) owns the checks of its own fields.
"""
from __future__ import annotations

import ml_collections

from moejax.errors import ConfigError
from moejax.moe import losses, registry

__all__ = ['ConfigError', 'base_config', 'from_dict', 'field_names', 'field_parent', 'get_field',
           'set_fields']


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
  m.qk_norm_after_rope = False  # 'head' / 'full': normalise after the rotation instead.
  m.qkv_bias = False  # gqa: biases on the query, key and value projections (Qwen2).
  m.mla = mla = ml_collections.ConfigDict()
  mla.q_lora_rank = 0  # 0: queries projected directly.
  mla.kv_lora_rank = 64
  mla.qk_nope_head_dim = 32
  mla.qk_rope_head_dim = 16
  mla.v_head_dim = 32
  mla.latent_norm_eps = 1e-6  # the query and key-value latents' RMSNorms (1e-6 in DeepSeek's)
  # DeepSeek Sparse Attention (model/indexer.py): index_topk > 0 puts a lightning indexer of
  # index_heads heads of index_head_dim in front of the attention (it needs q_lora_rank > 0)
  # and each query attends to its index_topk best earlier keys; 0: dense attention. The
  # indexer learns only from its KL loss, index_loss_weight per layer; index_warmup: attend
  # densely and fit the indexer over every earlier key (the paper's dense warm-up).
  mla.index_topk = 0
  mla.index_heads = 4
  mla.index_head_dim = 32
  mla.index_loss_weight = 1.0
  mla.index_warmup = False
  # Linear-attention layers: those whose entry in linear_pattern (repeated over the layers:
  # layer i reads entry i % len) is 1 mix tokens with Gated DeltaNet (model/linear_attention.py)
  # instead of softmax attention; () or all 0: none. E.g. (1, 1, 1, 0): three linear layers,
  # then one attention layer (Qwen3-Next). model.linear is the layer's settings; decay
  # 'channel', gate_fn 'sigmoid' and a gate_rank make it Kimi Delta Attention (a decay per key
  # channel, the output gate and decay inputs through a rank-gate_rank bottleneck).
  m.linear_pattern = ()
  m.linear = ml_collections.ConfigDict({'num_key_heads': 2, 'num_value_heads': 4,
                                        'key_head_dim': 32, 'value_head_dim': 32,
                                        'conv_kernel': 4, 'chunk': 64, 'decay': 'head',
                                        'gate_rank': 0, 'gate_fn': 'silu'})
  m.ffn_dim = 512  # width of the dense SwiGLU FFN layers.
  m.max_seq_len = 1024  # length of the RoPE table.
  m.rope_theta = 10000.0
  # Rotary frequencies stretched for long context (model/rope.py): kind 'none', 'llama3'
  # (Llama 3/4: wavelengths beyond original_max_len / low_freq_factor divided by factor, a
  # smooth blend in between) or 'yarn' (arXiv:2309.00071: dims turning fewer than beta_slow
  # times over original_max_len divided by factor, more than beta_fast times kept, a ramp
  # between, bounds rounded outward when truncate; cos and sin times attention_factor, 0:
  # 0.1 ln(factor) + 1) or 'longrope' (each frequency divided by its entry of long_factor when
  # a call's positions reach past original_max_len, else of short_factor; cos and sin times
  # attention_factor, 0: sqrt(1 + ln(factor) / ln(original_max_len))).
  m.rope_scaling = ml_collections.ConfigDict({'kind': 'none', 'factor': 8.0,
                                              'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                                              'original_max_len': 8192, 'beta_fast': 32.0,
                                              'beta_slow': 1.0, 'truncate': True,
                                              'attention_factor': 0.0, 'short_factor': (),
                                              'long_factor': ()})
  m.rotary_dim = 0  # gqa: rotate the first rotary_dim dims of each head (partial rotary); 0: all.
  # gqa: layers whose entry in sliding_pattern (repeated over the layers: layer i reads entry
  # i % len) is 1 attend to their sliding_window latest positions, their own included; 0: no
  # window. E.g. (1, 0): alternating with full attention, starting with a windowed layer.
  m.sliding_window = 0
  m.sliding_pattern = (1,)
  m.rope_layers = 'all'  # 'windowed': rotary on the windowed layers only (none on the full ones)
  # gqa: a learned logit per head joins each softmax as a column with no value (attention
  # sinks); a bias on the output projection; the heads' outputs scaled by sigmoid(x W_g)
  # before it (gated attention, arXiv:2505.06708).
  m.attention_sinks = False
  m.attention_out_bias = False
  m.attention_output_gate = False
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
  m.norm = 'rms'  # 'rms' (RMSNorm) or 'layer' (LayerNorm with a bias): every norm of a block.
  # Around each sublayer f: 'pre' x + f(norm(x)), 'post' x + norm(f(x)) (OLMo 2), 'both'
  # x + norm(f(norm(x))) (Gemma 2).
  m.norm_placement = 'pre'
  # Scalar multipliers (muP-style; Granite): the embeddings, each residual branch, the
  # attention logits (0: head_dim ** -0.5) and the output logits (divided by logit_divisor).
  m.embedding_multiplier = 1.0
  m.residual_multiplier = 1.0
  m.attention_scale = 0.0
  m.logit_divisor = 1.0
  m.tie_embeddings = False
  m.head_bias = False  # a bias on the output head (untied)
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
  # Default MoE (arXiv:2504.12463; moe/default_outputs.py): beta > 0 keeps an EMA (decay beta)
  # of each expert's outputs, which the experts a token did not choose contribute to the
  # router's gradient (not to the output); 0: off. Runs on the 'dropless' dispatcher.
  moe.default_outputs_decay = 0.0
  # The router, the dispatcher and the expert block are chosen by name; each section's other
  # fields are the settings of the registered pieces, collected from their classes with the
  # defaults (and meanings) the classes give: moe/routers/*.py, moe/dispatch/*.py,
  # moe/experts/*.py. A field the chosen piece does not read may not be set.
  # Routers: 'topk', 'noisy_topk', 'hash', 'sinkhorn', 'expert_choice', 'top_p', 'relu', ...
  # ('top_p' and 'relu' choose a variable number of experts per token, at most
  # num_experts_per_tok, the static number of routing slots).
  moe.router = _pieces('router', 'topk')
  # Balance. The weight of every balance loss (moe/losses.py, one row each: what it is, its
  # default weight; 0 turns it off): aux_loss_weight (Switch/GShard alpha * N sum f_i P_i, per
  # MoE layer), z_loss_weight (ST-MoE), seq_aux_loss_weight (DeepSeek-V3 sequence-wise),
  # device_loss_weight (DeepSeekMoE a2), comm_loss_weight (DeepSeek-V2 a3),
  # importance_loss_weight / load_loss_weight (Shazeer 2017), entropy_loss_weight (top-p
  # routing's dynamic loss, 1e-4), l1_target (ReMoE: the active experts per token its L1
  # penalty steers to, > 0 turns it on), simbal_loss_weight (SimBal: |W^T W - I| on the router
  # weight, learned routers).
  moe.balance = b = ml_collections.ConfigDict(losses.weight_defaults())
  # Tokens the Switch loss averages over: 'global' (the whole batch), 'micro_batch' (each
  # data-parallel rank's share, as plain data parallelism computes it) or 'sequence'.
  b.aux_loss_scope = 'global'
  b.num_devices = 0  # expert groups of the device and comm losses; 0: the mesh's expert axis.
  # ReMoE's adaptive L1 coefficient: lambda <- lambda * l1_growth^sign(target sparsity -
  # sparsity), from l1_init.
  b.l1_init = 1e-8
  b.l1_growth = 1.2
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
  # Dispatchers: 'auto' (dropless; with mesh.expert > 1 the tokens travel to the experts:
  # 'ragged_all_to_all' on TPU/GPU, 'ring' on CPU; moe/dispatch/auto.py), 'capacity' (indexed,
  # token dropping), 'einsum' (GShard one-hot, token dropping, per group of group_size tokens),
  # 'all_to_all' (capacity per device, shard_map all-to-all over the expert mesh axis),
  # 'dropless' (on one device's view: under an expert axis GSPMD gathers the experts' weights),
  # 'ring' (dropless expert parallelism: tokens all-gathered along the expert axis, outputs
  # reduce-scattered back), or 'ragged_all_to_all' (dropless, exact-size exchanges; TPU/GPU).
  moe.dispatch = _pieces('dispatch', 'auto')
  # Expert blocks: 'swiglu', or 'mlp' (two matrices, no gate: act(x W_in) W_out, Switch's and
  # GShard's experts); backend and block_size are the settings of its dropless kernels
  # (moejax/kernels: 'auto' is 'blocked' on CPU, else 'ragged_dot').
  moe.experts = _pieces('experts', 'swiglu')

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
  # A routing trace to train on (python -m moejax.routes --trace, or an inference engine's
  # routed experts with their tokens; format in moejax/routes/trace.py): the training batches
  # are its sequences (data.seq_len + 1 tokens each), every MoE layer routed as recorded
  # (router replay). Evaluation stays on the validation sets above. main --replay=FILE sets it.
  dt.replay = ''

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
  # Each evaluation runs over eval_batches batches sampled across the whole validation split
  # (a fixed sample: the same chunks at every evaluation and in every run; 0: the whole split).
  t.eval_batches = 8
  # At the last step, a final evaluation (final/... metrics, with the standard error of the
  # loss over the sequences): -1 none, 0 the whole validation split, N batches sampled across
  # it (the periodic sample is the start of that sample).
  t.final_eval_batches = -1
  t.checkpoint_every = 100
  t.keep_checkpoints = 3
  t.progress = True
  # Weights & Biases besides metrics.jsonl and TensorBoard (the `wandb` extra): the project to
  # log to ('': none), its entity ('': your default), the mode ('offline': written under
  # WORKDIR/wandb with no network, `wandb sync` uploads it; '': WANDB_MODE, else online), the
  # run's name ('': the workdir's) and group (experiments: the experiment's name).
  t.wandb_project = ''
  t.wandb_entity = ''
  t.wandb_mode = ''
  t.wandb_name = ''
  t.wandb_group = ''
  # The device's dense bf16 peak in TFLOP/s, for perf/mfu (model FLOPs utilisation); 0: the
  # table of moejax/costs/flops.py by device kind (TPU v4-v6e, A100-B200), none on CPU.
  t.peak_tflops = 0.0
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
  # Multi-slice: how many slices (TPU) or processes (GPU nodes, CPU hosts) the data or fsdp
  # axis spans, over the data-center network; the axis sizes above stay the totals. On several
  # TPU slices with both left at 1, the data axis spans the slices.
  ms.dcn_data = 1
  ms.dcn_fsdp = 1
  return c


def _pieces(kind: str, name: str) -> ml_collections.ConfigDict:
  """model.moe.<kind>: the chosen piece's name, and every registered piece's settings with
  their defaults (moe/registry.section_defaults)."""
  return ml_collections.ConfigDict({'name': name, **registry.section_defaults(kind)})


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


def get_field(config, dotted: str):
  """The value of a dotted field, e.g. get_field(c, 'train.steps')."""
  for part in dotted.split('.'):
    config = config[part]
  return config


def _merge(node, d: dict):
  for k, v in d.items():
    if k in node and isinstance(node[k], ml_collections.ConfigDict) and isinstance(v, dict):
      _merge(node[k], v)
    else:
      node[k] = v
