"""Shared helpers for the published-model configs (not a config itself; imported by them as
moejax.configs.published)."""
import difflib

from moejax.config import base_config, set_fields

ARGS = ('full', 'tiny')


def published(arg, full: dict, tiny: dict):
  """base_config() with the `full` model shape (sequences of 4096 tokens, or the model's
  max_seq_len if shorter), or its `tiny` CPU variant (same structure: attention kind,
  dense-first layers, shared experts, group-limited routing, gate)."""
  c = base_config()
  if arg not in (None, '', *ARGS):
    close = difflib.get_close_matches(arg, ARGS, n=1)
    hint = f"did you mean ':{close[0]}'? " if close else ''
    raise ValueError(f"config argument {arg!r}: {hint}use ':tiny' (a CPU-sized model of the "
                     "same structure) or nothing (the published shape)")
  set_fields(c, tiny if arg == 'tiny' else full)
  if arg != 'tiny':  # a pretraining context (most of these models start at 4096): FLOPs per
    c.data.seq_len = min(c.model.max_seq_len, 4096)  # token and the compile read it
  if arg == 'tiny':
    c.model.vocab_size, c.data.seq_len, c.train.batch_size = 258, 64, 8
    c.train.steps, c.train.warmup_steps, c.train.eval_every = 50, 5, 25
  return c
