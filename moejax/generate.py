"""Sample text from a trained checkpoint with a key/value cache.

python -m moejax.generate --workdir=DIR --prompt='def main(' [--max_new_tokens=200]
    [--temperature=0.8] [--top_p=0.95] [--seed=0]   (temperature 0: greedy)

Grouped-query attention caches keys and values; MLA caches only its latent and rotary key.
Text in, text out with the run's tokenizer (the training loop copies it into the workdir).
Routing at decode time is the evaluation routing, which must be causal (see
model/schedule.routing_is_causal): capacity dispatch with priority='choice' and expert choice
evaluated as expert choice are refused.
"""
from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax.errors import ConfigError
from moejax.model.schedule import routing_is_causal
from moejax.data import tokenizer as tokenizers
from moejax.data.tokenizer import ByteTokenizer
from moejax.model.transformer import Transformer


def decoding_model(model_cfg, cache_len: int) -> Transformer:
  return Transformer(ml_collections.FrozenConfigDict(model_cfg), train=False, cache_len=cache_len)


def empty_cache(model: Transformer, batch: int):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch, 1), jnp.int32),
                                             jnp.zeros((batch, 1), jnp.int32)))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['cache'])


@functools.partial(jax.jit, static_argnums=0)
def decode(model, variables, cache, tokens, positions, replay=None):
  """Run tokens [b, s] at absolute positions [b, s] through the cache: (logits, new cache).
  replay [M, b * s, K]: route the MoE layers as recorded."""
  (logits, _), mutated = model.apply({**variables, 'cache': cache}, tokens, positions, replay,
                                     mutable=['cache'])
  return logits, mutated['cache']


def sample_token(logits, rng, temperature: float, top_p: float):
  """logits [b, vocab] -> token ids [b]: greedy at temperature 0, else nucleus sampling."""
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1)
  logits = logits / temperature
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # always keeps the best token
  sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
  choice = jax.random.categorical(rng, sorted_logits, axis=-1)
  return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]


def generate(model_cfg, variables, prompt: np.ndarray, max_new_tokens: int, temperature=0.8,
             top_p=0.95, seed=0, stop_at_eos=True, eos_id: int = ByteTokenizer.eos_id,
             num_tokens: int | None = None, replay=None) -> np.ndarray:
  """prompt [b, P] int -> generated ids [b, max_new_tokens] (EOS-padded after an EOS).
  num_tokens: the tokenizer's size; ids past it (vocab_size padding) are never sampled.
  replay [b, P, M, K]: the prompt's routes (a trace's), replayed in the prefill."""
  if not routing_is_causal(model_cfg, train=False):
    raise ConfigError('this model routes non-causally at evaluation (capacity dispatch with '
                      "priority='choice', or expert choice with ec_eval='expert_choice'); "
                      'decoding one token at a time cannot reproduce it')
  b, p = prompt.shape
  cache_len = p + max_new_tokens
  if cache_len > model_cfg.max_seq_len:
    raise ConfigError(f'prompt + max_new_tokens = {cache_len} exceeds model.max_seq_len='
                      f'{model_cfg.max_seq_len}')
  model = decoding_model(model_cfg, cache_len)
  cache = empty_cache(model, b)
  positions = jnp.broadcast_to(jnp.arange(p), (b, p))
  if replay is not None:
    from moejax.routes.trace import to_model
    replay = jnp.asarray(to_model(replay))
  logits, cache = decode(model, variables, cache, jnp.asarray(prompt), positions, replay)
  rng = jax.random.key(seed)
  out, done = [], np.zeros((b,), bool)
  def trim(logits):
    if num_tokens is None or num_tokens >= logits.shape[-1]:
      return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < num_tokens, logits, -jnp.inf)

  last = trim(logits[:, -1])
  for i in range(max_new_tokens):
    rng, sub = jax.random.split(rng)
    tok = np.asarray(sample_token(last, sub, temperature, top_p))
    tok = np.where(done, eos_id, tok)
    out.append(tok)
    done |= tok == eos_id
    if stop_at_eos and done.all():
      break
    logits, cache = decode(model, variables, cache, jnp.asarray(tok)[:, None],
                           jnp.full((b, 1), p + i))
    last = trim(logits[:, -1])
  return np.stack(out, axis=1)


def load_checkpoint(workdir: str, step: int | None = None):
  """(config, variables) of the newest intact (or the given) checkpoint in workdir, read-only:
  a corrupt newer checkpoint is reported and passed over, not moved."""
  from moejax.training import workdir as workdirs
  run, _, state = workdirs.load(workdir, step)
  return run.config, {'params': state.params, **state.model_state}


def parser():
  from moejax import cli
  p = cli.ArgumentParser(prog='python -m moejax.generate', description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True, help='a training run or an imported Hugging Face '
                 'model (its newest intact checkpoint, and the tokenizer it carries)')
  p.add_argument('--prompt', default='', help='the text to continue (empty: start from EOS)')
  p.add_argument('--max_new_tokens', type=int, default=200,
                 help='tokens to generate (the prompt and these must fit model.max_seq_len)')
  p.add_argument('--temperature', type=float, default=0.8,
                 help='softmax temperature; 0: greedy (the most likely token every step)')
  p.add_argument('--top_p', type=float, default=0.95,
                 help='nucleus sampling: sample among the most likely tokens whose '
                 'probabilities sum to top_p (1: all tokens)')
  p.add_argument('--seed', type=int, default=0, help='the sampling seed')
  p.add_argument('--step', type=int, default=None,
                 help='a checkpoint step (None: the newest intact one)')
  p.add_argument('--replay', default=None, metavar='FILE',
                 help='a routing trace (python -m moejax.routes --trace): the prompt is its '
                 'sequence --replay_row, prefilled with the MoE layers routed as recorded '
                 '(instead of --prompt); the new tokens route as usual')
  p.add_argument('--replay_row', type=int, default=0,
                 help="which of the trace's sequences is the prompt (0: the first)")
  return p


def _main(argv=None) -> int:
  a = parser().parse_args(argv)
  if a.max_new_tokens < 1:
    raise ConfigError(f'--max_new_tokens={a.max_new_tokens}: must be at least 1')
  if not (np.isfinite(a.temperature) and a.temperature >= 0):
    raise ConfigError(f'--temperature={a.temperature}: must be a finite number >= 0')
  if not 0 < a.top_p <= 1:
    raise ConfigError(f'--top_p={a.top_p}: must be in (0, 1]')
  if os.path.exists(a.workdir) and not os.path.isdir(a.workdir):
    raise ConfigError(f'--workdir={a.workdir} is a file; give a training run\'s directory')
  tok = tokenizers.for_run(a.workdir)  # the run's tokenizer (bytes when it has none)
  replay, text = None, a.prompt
  if a.replay:
    from moejax.routes import trace as traces
    if a.prompt:
      raise ConfigError('--prompt and --replay: the prompt of a replay is the trace\'s '
                        'sequence (--replay_row); give one of them')
    trace = traces.read(a.replay)
    if not 0 <= a.replay_row < len(trace.expert_index):
      raise ConfigError(f'--replay_row={a.replay_row}: {a.replay} holds '
                        f'{len(trace.expert_index)} sequences (rows 0 to '
                        f'{len(trace.expert_index) - 1})')
  config, variables = load_checkpoint(a.workdir, a.step)
  if a.replay:
    traces.check(trace, config.model, need_tokens=True)
    prompt = np.asarray(trace.token_ids[a.replay_row], np.int32)
    replay, text = np.asarray(trace.expert_index[a.replay_row:a.replay_row + 1]), None
  else:
    prompt = tok.encode(a.prompt) if a.prompt else np.array([tok.eos_id], np.int32)
    if len(prompt) == 0:
      prompt = np.array([tok.eos_id], np.int32)
  ids = generate(config.model, variables, prompt[None], a.max_new_tokens, a.temperature,
                 a.top_p, a.seed, eos_id=tok.eos_id, num_tokens=tok.vocab_size, replay=replay)
  print((tok.decode(prompt) if text is None else text) + tok.decode(ids[0]))
  return 0


def main(argv=None) -> int:
  from moejax import cli
  return cli.run(_main, argv)


if __name__ == '__main__':
  sys.exit(main())
