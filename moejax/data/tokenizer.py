"""Byte-level tokenizer: ids 0-255 are bytes, then EOS (document end) and PAD."""
from __future__ import annotations

import numpy as np


class ByteTokenizer:
  eos_id = 256
  pad_id = 257
  vocab_size = 258

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode('utf-8') if isinstance(text, str) else text
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
    return data.decode('utf-8', errors='replace')
