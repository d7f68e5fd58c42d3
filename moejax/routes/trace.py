"""Routing traces: which experts each token used, in each MoE layer, written and read as NumPy
`.npz` files, and checked against a model before they are replayed.

The format (every array batch-major, the layout an inference engine such as vLLM returns for its
routed experts):
  expert_index  int32 [S, L, M, K]  the experts of each of S sequences of L tokens, in each of
                                    the model's M MoE layers, K slots (an index of N or more
                                    is a null slot: no expert)
  weights       float32 [S, L, M, K]  their gate weights (optional: moejax writes them; an
                                    engine's routed-experts output has none, and replay
                                    recomputes them from the router's scores)
  token_ids     int32 [S, L]        the tokens (needed to train or evaluate on the trace)
  moe_layers    int32 [M]           the model's layer numbers of the MoE layers (optional)
  num_experts   int32 []            N (optional)
Replaying routes the model's MoE layers as recorded instead of selecting; the gate weights are
the router's own for those experts, so gradients flow as usual (R3, Megatron's RouterReplay).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from moejax.errors import ConfigError
from moejax.model.schedule import moe_layer_ids


@dataclasses.dataclass
class Trace:
  expert_index: np.ndarray  # [S, L, M, K] int32
  token_ids: np.ndarray | None = None  # [S, L] int32
  weights: np.ndarray | None = None  # [S, L, M, K] float32
  moe_layers: np.ndarray | None = None  # [M]
  num_experts: int | None = None


def write(path: str, trace: Trace) -> str:
  """Write a trace (.npz, compressed), atomically."""
  arrays = {'expert_index': np.asarray(trace.expert_index, np.int32)}
  for name in ('token_ids', 'weights', 'moe_layers'):
    value = getattr(trace, name)
    if value is not None:
      arrays[name] = np.asarray(value, np.float32 if name == 'weights' else np.int32)
  if trace.num_experts is not None:
    arrays['num_experts'] = np.asarray(trace.num_experts, np.int32)
  tmp = path + '.tmp.npz'
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, path)
  return path


def read(path: str, what: str = '--replay') -> Trace:
  """Read a trace file; one line naming the file and the problem when it is not one."""
  if not os.path.isfile(path):
    raise ConfigError(f'{what}={path}: no such file')
  try:
    data = np.load(path)
  except (OSError, ValueError) as e:
    raise ConfigError(f'{what}={path}: not a NumPy .npz file ({type(e).__name__})') from None
  if 'expert_index' not in data:
    raise ConfigError(f'{what}={path}: holds no expert_index array (the routed experts, '
                      '[sequences, tokens, MoE layers, K]); it has ' + ', '.join(data.files))
  get = lambda k: data[k] if k in data else None  # noqa: E731
  n = get('num_experts')
  return Trace(data['expert_index'], get('token_ids'), get('weights'), get('moe_layers'),
               None if n is None else int(n))


def check(trace: Trace, model_cfg, what: str = '--replay', need_tokens: bool = False) -> None:
  """Refuse, in one line naming the mismatch, a trace that does not fit the model: its shape
  (4 dims, its MoE layers, K slots), its expert ids, its tokens."""
  idx = np.asarray(trace.expert_index)
  moe = model_cfg.moe
  layers = moe_layer_ids(model_cfg)
  k, n = moe.num_experts_per_tok, moe.num_experts
  if idx.ndim != 4:
    raise ConfigError(f'{what}: expert_index has shape {list(idx.shape)}; a trace is '
                      '[sequences, tokens, MoE layers, K]')
  if idx.shape[2] != len(layers):
    raise ConfigError(f'{what}: expert_index has {idx.shape[2]} MoE layers (shape '
                      f'{list(idx.shape)}), the model {len(layers)} (layers {layers})')
  if idx.shape[3] != k:
    raise ConfigError(f'{what}: expert_index has {idx.shape[3]} experts per token, the model '
                      f'routes {k} (model.moe.num_experts_per_tok)')
  if not np.issubdtype(idx.dtype, np.integer):
    raise ConfigError(f'{what}: expert_index is {idx.dtype}; expert ids are integers')
  if idx.size and (idx.min() < 0 or idx.max() > n + moe.router.null_experts):
    bad = int(idx.min()) if idx.min() < 0 else int(idx.max())
    raise ConfigError(f'{what}: expert id {bad} does not fit the model\'s {n} experts (ids 0 '
                      f'to {n - 1}; {n} marks an unused slot)')
  traced = None if trace.moe_layers is None else [int(x) for x in np.ravel(trace.moe_layers)]
  if traced is not None and traced != list(layers):
    raise ConfigError(f'{what}: traced at MoE layers {traced}, the model has {layers}')
  if trace.token_ids is not None:
    t = np.asarray(trace.token_ids)
    if t.shape != idx.shape[:2]:
      raise ConfigError(f'{what}: token_ids has shape {list(t.shape)}, expert_index '
                        f'{list(idx.shape[:2])} sequences x tokens')
    if t.size and (t.min() < 0 or t.max() >= model_cfg.vocab_size):
      raise ConfigError(f'{what}: token id {int(t.max())} is outside the model\'s vocabulary '
                        f'of {model_cfg.vocab_size}')
  elif need_tokens:
    raise ConfigError(f'{what}: the trace holds no token_ids; training and evaluation on a '
                      'trace need the tokens it routed')
  from moejax.moe.registry import ROUTERS
  if not ROUTERS[moe.router.name].REPLAY:
    from moejax.moe.registry import replaying_routers
    raise ConfigError(f"{what}: model.moe.router.name={moe.router.name!r} cannot route as "
                      f"recorded; replay needs one of {replaying_routers()}")


def to_model(expert_index) -> np.ndarray:
  """[b, s, M, K] (a trace's batch) -> [M, b * s, K], the layout Transformer(replay=) takes."""
  idx = np.asarray(expert_index)
  b, s, m, k = idx.shape
  return idx.transpose(2, 0, 1, 3).reshape(m, b * s, k)


def from_model(expert_index, batch: int) -> np.ndarray:
  """aux['expert_index'] [M, b * s, K] -> [b, s, M, K]."""
  idx = np.asarray(expert_index)
  m, t, k = idx.shape
  return idx.reshape(m, batch, t // batch, k).transpose(1, 2, 0, 3)


class ReplayRows:
  """A trace as training data (data.replay): item i is {'tokens': [L], 'routes': [L, M, K]};
  the batches' inputs are tokens[:-1], routed as routes[:-1] (pipeline._to_example)."""

  def __init__(self, trace: Trace):
    self.tokens = np.asarray(trace.token_ids, np.int32)
    self.routes = np.asarray(trace.expert_index, np.int32)
    self.seq_len = self.tokens.shape[1] - 1

  @classmethod
  def open(cls, path: str, config) -> 'ReplayRows':
    """Read and check the trace at `path` for training `config` (its sequences must be
    data.seq_len + 1 tokens: inputs and the shifted targets)."""
    what = 'config.data.replay'
    trace = read(path, what)
    check(trace, config.model, what, need_tokens=True)
    length = trace.token_ids.shape[1]
    if length != config.data.seq_len + 1:
      raise ConfigError(f'{what}={path}: its sequences are {length} tokens; training on them '
                        f'needs data.seq_len = {length} - 1 (--config.data.seq_len={length - 1})')
    return cls(trace)

  @property
  def num_tokens(self) -> int:
    return self.tokens.size

  def __len__(self):
    return len(self.tokens)

  def __getitem__(self, i):
    return {'tokens': self.tokens[i], 'routes': self.routes[i]}
