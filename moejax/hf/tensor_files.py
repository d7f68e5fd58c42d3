"""Safetensors files read and written tensor by tensor, with numpy only (no torch).

The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets: [begin, end]}, '__metadata__': {...}}, then the raw little-endian data. A sharded
checkpoint adds `model.safetensors.index.json` ({'weight_map': {name: file}}).

Reading memory-maps each file, so a tensor costs memory only while it is used; writing takes
(name, array) pairs one at a time, so a converter never holds two copies of the weights.
bfloat16 comes from ml_dtypes (a JAX dependency).
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from moejax.errors import ConfigError

DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
          'BF16': ml_dtypes.bfloat16, 'I64': np.int64, 'I32': np.int32, 'I16': np.int16,
          'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
          'F8_E4M3': ml_dtypes.float8_e4m3fn, 'F8_E5M2': ml_dtypes.float8_e5m2}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


def _header(path: str) -> tuple[dict, int]:
  with open(path, 'rb') as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise ConfigError(f'{path}: not a safetensors file (too short)')
    (n,) = struct.unpack('<Q', raw)
    if n > os.path.getsize(path):
      raise ConfigError(f'{path}: not a safetensors file (bad header length)')
    try:
      return json.loads(f.read(n)), 8 + n
    except ValueError:
      raise ConfigError(f'{path}: not a safetensors file (the header is not JSON)') from None


class Reader:
  """All tensors of a Hugging Face folder (one file, or shards with an index)."""

  def __init__(self, folder: str):
    index = os.path.join(folder, 'model.safetensors.index.json')
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)['weight_map'].values()))
    else:
      files = sorted(f for f in os.listdir(folder) if f.endswith('.safetensors'))
    if not files:
      raise ConfigError(f'--hf_dir={folder}: holds no .safetensors weights (PyTorch .bin '
                        'checkpoints are not read: save with safe_serialization=True)')
    self.where, self.metadata = {}, {}
    for name in files:
      path = os.path.join(folder, name)
      if not os.path.exists(path):
        raise ConfigError(f'--hf_dir={folder}: the index lists {name}, which is missing')
      header, start = _header(path)
      self.metadata.update(header.pop('__metadata__', None) or {})
      for key, info in header.items():
        self.where[key] = (path, start, info)
    self._maps = {}
    self.read_names = set()  # the tensors handed out by get(), for the import's report

  def keys(self):
    return self.where.keys()

  def __contains__(self, name):
    return name in self.where

  def shape(self, name: str) -> tuple:
    return tuple(self.where[name][2]['shape'])

  def nbytes(self, name: str) -> int:
    a, b = self.where[name][2]['data_offsets']
    return b - a

  def dtype(self, name: str) -> str:
    return self.where[name][2]['dtype']

  def get(self, name: str) -> np.ndarray:
    """The tensor (a read-only view of the memory-mapped file)."""
    if name not in self.where:
      raise ConfigError(f'the checkpoint has no tensor {name!r}')
    path, start, info = self.where[name]
    if info['dtype'] not in DTYPES:
      raise ConfigError(f'tensor {name}: dtype {info["dtype"]} is not supported')
    if path not in self._maps:
      self._maps[path] = np.memmap(path, dtype=np.uint8, mode='r')
    a, b = info['data_offsets']
    self.read_names.add(name)
    return self._maps[path][start + a:start + b].view(DTYPES[info['dtype']]).reshape(
        info['shape'])


def write(folder: str, tensors, shard_bytes: int = 5 << 30, metadata=None) -> list[str]:
  """Write (name, np.ndarray) pairs, from an iterable given as a list of (name, shape, dtype,
  producer) so each tensor is made only when written; shards of at most shard_bytes, with an
  index when more than one. Returns the file names."""
  os.makedirs(folder, exist_ok=True)
  shards, current, size = [], [], 0
  for spec in tensors:
    nbytes = int(np.prod(spec[1])) * np.dtype(spec[2]).itemsize
    if current and size + nbytes > shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(spec)
    size += nbytes
  if current:
    shards.append(current)
  names = (['model.safetensors'] if len(shards) == 1 else
           [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))])
  weight_map = {}
  for fname, shard in zip(names, shards):
    header, offset = {'__metadata__': {'format': 'pt', **(metadata or {})}}, 0
    for name, shape, dtype, _ in shard:
      nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
      header[name] = {'dtype': NAMES[np.dtype(dtype)], 'shape': list(shape),
                      'data_offsets': [offset, offset + nbytes]}
      offset += nbytes
      weight_map[name] = fname
    raw = json.dumps(header, separators=(',', ':')).encode()
    raw += b' ' * (-len(raw) % 8)  # the data starts 8-byte aligned
    path = os.path.join(folder, fname)
    with open(path + '.tmp', 'wb') as f:
      f.write(struct.pack('<Q', len(raw)) + raw)
      for name, shape, dtype, make in shard:
        array = np.ascontiguousarray(make(), dtype=dtype)
        if array.shape != tuple(shape):
          raise ValueError(f'{name}: produced {array.shape}, declared {tuple(shape)}')
        f.write(array.tobytes())
    os.replace(path + '.tmp', path)
  if len(names) > 1:
    with open(os.path.join(folder, 'model.safetensors.index.json'), 'w') as f:
      json.dump({'metadata': {}, 'weight_map': weight_map}, f, indent=1)
  return names
