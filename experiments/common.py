"""Shared base config, smoke settings and compute ladders for the experiments in this folder
(not an experiment; imported as moejax.experiments.common).

The base is a small byte-level decoder on Python's standard library (the quickstart corpus):
d_model 64, 4 layers (the first dense), 8 routed experts of width 128, top-2 (active FFN width
256, the dense layer's width), dropless dispatch, AdamW. Sized so one run takes well under a
minute on a 2-core CPU; each experiment changes only what it compares. Every run ends with an
evaluation on the whole validation split (train.final_eval_batches = 0) and its final checkpoint
is scored on a downstream task (TASKS).
"""
from moejax.config import base_config
from moejax.experiment import Rung, Tasks

# --smoke: a few steps on a small slice of the corpus, so the tests can run every experiment.
SMOKE = {'train.steps': 4, 'train.warmup_steps': 1, 'train.log_every': 2, 'train.eval_every': 2,
         'train.checkpoint_every': 2, 'train.eval_batches': 1, 'train.batch_size': 8,
         'data.seq_len': 32, 'data.max_bytes': 100_000, 'train.final_eval_batches': 2}

# The downstream task of every experiment (experiments/tasks/python_line_end.yaml): which of four
# endings completes a line, at 1000 lines of the corpus's held-out files (chance 25%); the report
# compares accuracy like the loss, equivalent within 2 points.
TASKS = Tasks(('python_line_end',), metric='acc', delta=0.02)


def base(steps: int = 200):
  c = base_config()
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim = 64, 4, 4, 2, 16
  m.ffn_dim, m.first_k_dense, m.moe_layer_freq = 256, 1, 1
  m.moe.num_experts, m.moe.num_experts_per_tok, m.moe.expert_ffn_dim = 8, 2, 128
  m.moe.num_shared_experts = 0
  # dispatch: the default 'auto', dropless (on an expert axis, the tokens travel to the experts)
  c.data.seq_len = 64
  t = c.train
  t.steps, t.batch_size, t.lr, t.warmup_steps = steps, 16, 3e-3, steps // 10
  t.log_every, t.eval_every, t.eval_batches = 10, steps // 4, 4
  t.checkpoint_every, t.keep_checkpoints = steps // 2, 2
  t.final_eval_batches = 0
  return c


def schedule(steps: int) -> dict:
  """The train fields that follow the number of steps (warmup a tenth, four evaluations, two
  checkpoints)."""
  return {'train.steps': steps, 'train.warmup_steps': steps // 10,
          'train.eval_every': steps // 4, 'train.checkpoint_every': steps // 2}


def shape(d: int, heads: int = 4, kv_heads: int = 2) -> dict:
  """The model's width: d_model, heads of d / heads, the dense FFN 4 d, experts of width 2 d
  (top-2: an active expert width of 4 d, the dense FFN's)."""
  return {'model.d_model': d, 'model.num_heads': heads, 'model.num_kv_heads': kv_heads,
          'model.head_dim': d // heads, 'model.ffn_dim': 4 * d,
          'model.moe.expert_ffn_dim': 2 * d}


# The CPU ladder: width and steps grow together, each rung about twice the compute of the one
# below (r0 to r3 span 9x in training FLOPs; moejax/costs/flops.py); 5 seeds on the two lower
# rungs, 3 above.
CPU_LADDER = {
    'r0': Rung({**shape(48), **schedule(150)}, seeds=(0, 1, 2, 3, 4)),
    'r1': Rung({**shape(64), **schedule(200)}, seeds=(0, 1, 2, 3, 4)),
    'r2': Rung({**shape(80), **schedule(280)}, seeds=(0, 1, 2)),
    'r3': Rung({**shape(96), **schedule(380)}, seeds=(0, 1, 2)),
}


def tpu_base(steps: int = 400):
  """The accelerator preset's base: bfloat16, 8 layers (the first dense), 16 experts,
  sequences of 512 in batches of 64, each block rematerialised, on a prepared corpus the user
  names with --config.data.prepared_dir (and --config.model.vocab_size, its tokenizer's size).
  Compiled for one Colab TPU chip (`python -m moejax.compile --experiment=NAME:tpu
  --topology=v5e-1`; docs/pod.md): without remat, 10 of 12 cells of experiment 1 ran out of
  its 15.75 GiB."""
  c = base(steps)
  m = c.model
  m.dtype, m.num_layers, m.max_seq_len, m.remat = 'bfloat16', 8, 512, 'full'
  m.moe.num_experts = 16
  c.data.source, c.data.seq_len, c.data.vocab_multiple = 'prepared', 512, 128
  c.train.batch_size, c.train.lr = 64, 1e-3
  c.train.final_eval_batches = 200  # 6.5M tokens sampled across the split
  return c


TPU_LADDER = {
    'r0': Rung({**shape(384, 6, 6), **schedule(400)}, seeds=(0, 1, 2, 3, 4)),
    'r1': Rung({**shape(512, 8, 8), **schedule(530)}, seeds=(0, 1, 2, 3, 4)),
    'r2': Rung({**shape(640, 10, 10), **schedule(730)}, seeds=(0, 1, 2)),
    'r3': Rung({**shape(768, 12, 12), **schedule(1000)}, seeds=(0, 1, 2)),
}


def preset(arg):
  """(base config, rungs) of an experiment's preset: '' the CPU ladder, 'tpu' the accelerator
  one."""
  if arg in (None, ''):
    return base(), CPU_LADDER
  if arg == 'tpu':
    return tpu_base(), TPU_LADDER
  raise ValueError(f"no preset {arg!r}: use ':tpu' or nothing (the CPU ladder)")
