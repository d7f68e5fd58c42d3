"""Running a model over token sequences and keeping its routing: the experts and gate weights of
every token in every MoE layer (the evaluation routing), or routing as a trace recorded."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from moejax.model.schedule import moe_layer_ids
from moejax.routes import trace as traces


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, variables, tokens, replay):
  logits, aux = model.apply(variables, tokens, None, replay)
  return logits, {'expert_index': aux['expert_index'], 'combine_weights': aux['combine_weights']}


def forward(run, state, tokens, replay=None):
  """The evaluation model on tokens [b, s]: (logits [b, s, V], {'expert_index',
  'combine_weights'} each [M, b * s, K]). replay [b, s, M, K]: route as recorded."""
  variables = {'params': state.params, **state.model_state}
  with run.trainer.context():
    r = None if replay is None else jnp.asarray(traces.to_model(replay))
    return _apply(run.trainer.eval_model, variables, jnp.asarray(tokens, jnp.int32), r)


def next_token_losses(logits, tokens) -> np.ndarray:
  """[b]: each sequence's mean loss (nats) of predicting tokens[:, 1:] from logits[:, :-1]."""
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)[:, :-1], axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], axis=-1)[..., 0]
  return np.asarray(jnp.mean(nll, axis=-1))


@dataclasses.dataclass
class Collected:
  trace: traces.Trace
  row_loss: np.ndarray  # [S] each sequence's mean next-token loss (nats)


class _Parts:
  """One pass's routing and losses, batch by batch, assembled into a Collected."""

  def __init__(self):
    self.idx, self.weights, self.losses = [], [], []

  def add(self, part, logits, aux):
    aux = jax.device_get(aux)
    self.idx.append(traces.from_model(aux['expert_index'], len(part)))
    self.weights.append(traces.from_model(aux['combine_weights'], len(part)))
    self.losses.append(next_token_losses(logits, part))

  def done(self, run, rows) -> Collected:
    model = run.config.model
    trace = traces.Trace(np.concatenate(self.idx).astype(np.int32), rows.astype(np.int32),
                         np.concatenate(self.weights).astype(np.float32),
                         np.asarray(moe_layer_ids(model), np.int32), model.moe.num_experts)
    return Collected(trace, np.concatenate(self.losses))


def collect(run, state, rows, batch: int, replay=None, progress=None) -> Collected:
  """The routing and losses of the model on `rows` [S, L] (token ids), `batch` sequences at a
  time; replay [S, L, M, K]: routed as recorded instead.

  Returns:
    Collected: a Trace (expert_index, weights [S, L, M, K], token_ids [S, L]) and each row's
    loss [S].
  """
  rows = np.asarray(rows)
  parts = _Parts()
  for start in range(0, len(rows), batch):
    part = rows[start:start + batch]
    parts.add(part, *forward(run, state, part,
                             None if replay is None else replay[start:start + batch]))
    if progress is not None:
      progress(len(part))
  return parts.done(run, rows)


def collect_replay(run, state, rows, batch: int, replay,
                   progress=None) -> tuple[Collected, Collected, float]:
  """Both passes over `rows` [S, L], batch by batch: routed as `replay` [S, L, M, K] recorded,
  and as the model routes itself.

  Returns:
    (the replayed pass, the model's own pass, the largest |logit difference| between them).
  """
  rows = np.asarray(rows)
  replayed, own, diff = _Parts(), _Parts(), 0.0
  for start in range(0, len(rows), batch):
    part = rows[start:start + batch]
    lr, aux_r = forward(run, state, part, replay[start:start + batch])
    lo, aux_o = forward(run, state, part)
    replayed.add(part, lr, aux_r)
    own.add(part, lo, aux_o)
    diff = max(diff, float(jnp.max(jnp.abs(lr - lo))))
    if progress is not None:
      progress(2 * len(part))
  return replayed.done(run, rows), own.done(run, rows), diff
