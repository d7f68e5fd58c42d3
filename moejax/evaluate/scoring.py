"""A checkpoint as a scorer of token sequences: the log-likelihood of a continuation after its
context, and greedy continuations. What lm-evaluation-harness asks of a model, in moejax's own
terms (token ids in, numbers out); `harness.py` turns text into these ids as lm-eval defines.

Rows are scored in batches of `batch_size`, right-padded to a bucket length (a power of two, at
least 16, at most the model's max_seq_len), so one jitted program serves every row of a bucket.
The model is causal, so padding after a row never changes its scores; with token-dropping
dispatch (capacity), tokens compete for expert slots with the other rows of their batch, so
a score can depend on what it was batched with (`--batch_size=1` scores each row alone).
Log-probabilities are normalised over the model's whole vocabulary, as Hugging Face's models
and lm-eval's `hf` backend do.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax.model.transformer import Transformer

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Scored:
  """One continuation's score."""
  logprob: float  # sum over its tokens of log p(token | everything before it)
  greedy: bool  # every token the model's argmax


@functools.partial(jax.jit, static_argnums=0)
def _token_scores(model, variables, inputs, targets):
  """inputs, targets [b, L] -> (log p(target) [b, L] float32, target is the argmax [b, L])."""
  logits, _ = model.apply(variables, inputs)
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return picked, jnp.argmax(logits, axis=-1) == targets


def bucket(n: int, max_length: int) -> int:
  """The padded length of a row of n input tokens: the next power of two (>= MIN_BUCKET),
  capped at max_length."""
  return min(max(MIN_BUCKET, 1 << max(0, n - 1).bit_length()), max_length)


class Scorer:
  """A model's parameters and config, scoring token rows.

  Args:
    model_cfg: the config's `model` section.
    variables: {'params': ..., and the model state's collections}.
    batch_size: rows per forward pass.
    max_length: the longest input the model is given (default: model.max_seq_len); longer
      rows lose their oldest context tokens, as lm-eval's `hf` backend does.
    pad_id: the token that fills a row up to its bucket.
  """

  def __init__(self, model_cfg, variables, batch_size: int = 8, max_length: int = 0,
               pad_id: int = 0):
    self.cfg = model_cfg
    self.model = Transformer(ml_collections.FrozenConfigDict(model_cfg), train=False)
    self.variables = variables
    self.batch_size = batch_size
    self.max_length = max_length or int(model_cfg.max_seq_len)
    self.pad_id = pad_id

  def loglikelihood(self, rows: list[tuple[list[int], list[int]]]) -> list[Scored]:
    """rows: (context ids, continuation ids) -> each continuation's Scored, in order.

    The model reads (context + continuation)[:-1], cut to the last max_length tokens, and the
    continuation's tokens are scored at the last len(continuation) positions.
    """
    prepared = []
    for context, continuation in rows:
      if not continuation:
        raise ValueError('an empty continuation has nothing to score')
      if len(continuation) > self.max_length:
        raise ValueError(f'a continuation of {len(continuation)} tokens is longer than the '
                         f'model reads at once ({self.max_length})')
      whole = (list(context) + list(continuation))[-(self.max_length + 1):]
      prepared.append((whole[:-1], whole[1:], len(continuation)))
    out: list[Scored | None] = [None] * len(rows)
    # Longest first, so a batch's rows share a bucket (lm-eval's order too).
    order = sorted(range(len(rows)), key=lambda i: -len(prepared[i][0]))
    for start in range(0, len(order), self.batch_size):
      idx = order[start:start + self.batch_size]
      length = bucket(len(prepared[idx[0]][0]), self.max_length)
      inputs = np.full((self.batch_size, length), self.pad_id, np.int32)
      targets = np.full((self.batch_size, length), self.pad_id, np.int32)
      for r, i in enumerate(idx):
        inp, tgt, _ = prepared[i]
        inputs[r, :len(inp)], targets[r, :len(tgt)] = inp, tgt
      logp, greedy = jax.device_get(_token_scores(self.model, self.variables,
                                                  jnp.asarray(inputs), jnp.asarray(targets)))
      for r, i in enumerate(idx):
        inp, _, n = prepared[i]
        span = slice(len(inp) - n, len(inp))
        out[i] = Scored(float(np.sum(logp[r, span], dtype=np.float64)),
                        bool(np.all(greedy[r, span])))
    return out

  def greedy(self, context: list[int], max_new_tokens: int, eos_id: int,
             num_tokens: int | None = None) -> list[int]:
    """The greedy continuation of context (cut to fit with max_new_tokens), through the KV
    cache of `generate`; stops after EOS."""
    from moejax.generate import generate
    keep = max(1, self.max_length - max_new_tokens)
    prompt = np.asarray(list(context)[-keep:] or [eos_id], np.int32)[None]
    ids = generate(self.cfg, self.variables, prompt, max_new_tokens, temperature=0.0,
                   eos_id=eos_id, num_tokens=num_tokens)[0]
    ids = [int(t) for t in ids]
    return ids[:ids.index(eos_id)] if eos_id in ids else ids
