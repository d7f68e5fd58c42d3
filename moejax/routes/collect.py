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


def collect(run, state, rows, batch: int, replay=None, progress=None) -> Collected:
  """The routing and losses of the model on `rows` [S, L] (token ids), `batch` sequences at a
  time; replay [S, L, M, K]: routed as recorded instead.

  Returns:
    Collected: a Trace (expert_index, weights [S, L, M, K], token_ids [S, L]) and each row's
    loss [S].
  """
  rows = np.asarray(rows)
  idx, weights, losses = [], [], []
  for start in range(0, len(rows), batch):
    part = rows[start:start + batch]
    logits, aux = forward(run, state, part,
                          None if replay is None else replay[start:start + batch])
    aux = jax.device_get(aux)
    idx.append(traces.from_model(aux['expert_index'], len(part)))
    weights.append(traces.from_model(aux['combine_weights'], len(part)))
    losses.append(next_token_losses(logits, part))
    if progress is not None:
      progress(len(part))
  model = run.config.model
  trace = traces.Trace(np.concatenate(idx).astype(np.int32), rows.astype(np.int32),
                       np.concatenate(weights).astype(np.float32),
                       np.asarray(moe_layer_ids(model), np.int32), model.moe.num_experts)
  return Collected(trace, np.concatenate(losses))
