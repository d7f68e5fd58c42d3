"""moejax as an lm-evaluation-harness model: `MoejaxLM` (registered as `moejax`, so
`lm_eval --model moejax --model_args workdir=RUN` works too) and `evaluate()` behind
`python -m moejax.evaluate`.

Text becomes token ids exactly as lm-eval's own `hf` backend makes them: lm-eval's TemplateLM
splits (context, continuation) (trailing spaces of the context move to the continuation, the
pair is encoded whole and the context's tokens cut off its front; an empty context becomes the
prefix token: BOS when the tokenizer has one, else EOS), and `tok_encode` applies the
tokenizer's own special tokens the way `transformers` does by default. Rolling log-likelihoods
(perplexity tasks) score the disjoint windows of lm-eval's `get_rolling_token_windows`.
"""
from __future__ import annotations

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from moejax.data import tokenizer as tokenizers
from moejax.evaluate.scoring import Scorer


def _encoder(tok):
  """(text, add_special_tokens) -> ids: the tokenizer file's own rules for special tokens
  (`transformers` applies a tokenizer.json's post-processor unless told not to)."""
  if isinstance(tok, tokenizers.HFTokenizer):
    return lambda text, special: list(tok.tok.encode(text, add_special_tokens=special).ids)
  if isinstance(tok, tokenizers.SentencePieceTokenizer):
    return lambda text, special: ([tok.bos_id] if special and tok.bos_id is not None else []) \
        + [int(i) for i in tok.encode(text)]
  return lambda text, special: [int(i) for i in tok.encode(text)]  # bytes: no special tokens


@register_model('moejax')
class MoejaxLM(TemplateLM):
  """A moejax checkpoint (a training run, an imported Hugging Face model, an experiment's run)
  with the tokenizer it carries.

  Args:
    workdir: the run's directory.
    step: a checkpoint step (default: the newest intact one).
    batch_size: rows per forward pass.
    max_length: the longest input (default: model.max_seq_len).
  """

  def __init__(self, workdir: str, step: int | None = None, batch_size: int = 8,
               max_length: int = 0, **_):
    super().__init__()
    from moejax.training import workdir as workdirs
    self.tok = tokenizers.for_run(workdir)
    self._encode = _encoder(self.tok)
    run, self.step, state = workdirs.load(workdir, None if step in (None, '') else int(step))
    config, variables = run.config, {'params': state.params, **state.model_state}
    self.config = config
    self.scorer = Scorer(config.model, variables, int(batch_size), int(max_length),
                         pad_id=self.tok.eos_id)

  @property
  def eot_token_id(self) -> int:
    return int(self.tok.eos_id)

  @property
  def prefix_token_id(self) -> int:
    bos = getattr(self.tok, 'bos_id', None)
    return int(bos) if bos is not None else self.eot_token_id

  @property
  def max_length(self) -> int:
    return self.scorer.max_length

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_) -> list[int]:
    return self._encode(string, True if add_special_tokens is None else add_special_tokens)

  def tok_decode(self, ids) -> str:
    return self.tok.decode(ids)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_):
    scored = self.scorer.loglikelihood([(ctx, cont) for _, ctx, cont in requests])
    return [(s.logprob, s.greedy) for s in scored]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    out = []
    for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm,
                          desc='rolling log-likelihood'):
      windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)]
      out.append(float(np.sum([s.logprob for s in self.scorer.loglikelihood(windows)],
                              dtype=np.float64)))
    return out

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    out = []
    for context, kwargs in tqdm([r.args for r in requests], disable=disable_tqdm,
                                desc='generate_until'):
      kwargs = dict(kwargs or {})
      until = kwargs.get('until') or []
      until = [until] if isinstance(until, str) else list(until)
      new = int(kwargs.get('max_gen_toks', 256))
      ids = self.scorer.greedy(self.tok_encode(context), new, self.eot_token_id,
                               num_tokens=self.tok.vocab_size)
      text = self.tok_decode(ids)
      cuts = [text.index(u) for u in until if u and u in text]
      out.append(text[:min(cuts)] if cuts else text)
    return out

