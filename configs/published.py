"""Shared helpers for the published-model configs (not a config itself)."""
from moejax.config import base_config


def published(arg, full: dict, tiny: dict):
  """base_config() with the `full` model shape, or its `tiny` CPU variant (same structure:
  attention kind, dense-first layers, shared experts, group-limited routing, gate)."""
  c = base_config()
  shape = tiny if arg == 'tiny' else full
  if arg not in (None, '', 'full', 'tiny'):
    raise ValueError(f"config argument {arg!r}: use ':tiny' or nothing (the published shape)")
  for key, value in shape.items():
    node = c
    *path, last = key.split('.')
    for p in path:
      node = node[p]
    node[last] = value
  if arg == 'tiny':
    c.model.vocab_size, c.data.seq_len, c.train.batch_size = 258, 64, 8
    c.train.steps, c.train.warmup_steps, c.train.eval_every = 50, 5, 25
  return c
