"""Train state, optimizer, loss, and the jitted, sharded train and eval steps."""
from __future__ import annotations

import collections
import contextlib
import copy
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn
from flax import struct

from moejax.model.transformer import Transformer
from moejax.moe import balance
from moejax.moe import losses
from moejax.nn import names
from moejax.parallel import sharding


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any  # non-trainable collections, e.g. {'moe_state': loss-free router biases}


def learning_rate(t) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.lr, warmup_steps=t.warmup_steps, decay_steps=t.steps,
      end_value=t.lr * t.min_lr_ratio)


def _decay_mask(params):
  # No weight decay on norm scales (1-D parameters), as is usual for LMs.
  return jax.tree.map(lambda p: p.ndim > 1 if not isinstance(p, nn.Partitioned)
                      else p.value.ndim > 1, params,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _router_labels(params):
  """'frozen' for router parameters, 'trained' for the rest."""
  def label(path, _):
    return 'frozen' if any(getattr(p, 'key', None) == names.ROUTER for p in path) else 'trained'
  return jax.tree_util.tree_map_with_path(label, params,
                                          is_leaf=lambda x: isinstance(x, nn.Partitioned))


def make_optimizer(t, freeze_router: bool = False) -> optax.GradientTransformation:
  tx = optax.chain(
      optax.clip_by_global_norm(t.grad_clip) if t.grad_clip else optax.identity(),
      optax.adamw(learning_rate(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                  mask=_decay_mask))
  if freeze_router:  # no update at all, weight decay included
    tx = optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, _router_labels)
  return tx


def cross_entropy(logits, targets):
  """Mean next-token cross-entropy (nats) of logits [b, s, V] against targets [b, s]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def row_cross_entropy(logits, targets):
  """Each sequence's mean cross-entropy [b]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], axis=-1)


def mtp_total(aux: dict, targets, mtp_cfg, metrics: dict):
  """lambda / D * sum_k CE_k; depth k's logits at position i predict targets[i + k]."""
  if 'mtp_logits' not in aux:
    return 0.0
  ces = []
  for k, logits in enumerate(aux['mtp_logits'], start=1):
    ces.append(cross_entropy(logits, targets[:, k:]))
    metrics[f'train/mtp_ce_{k}'] = ces[-1]
  loss = mtp_cfg.loss_weight / len(ces) * sum(ces) + aux['mtp_moe_loss']
  metrics['train/mtp_loss'] = loss
  return loss


def moe_metrics(aux: dict) -> dict:
  """Per-layer aux (leaves [num_moe_layers, ...]) -> logged metrics (means over layers): every
  balance loss the layers computed (moe/losses.py), the routing statistics, and the same per
  MoE layer for the statistics and the monitored losses."""
  if 'z_loss' not in aux:  # no MoE layer
    return {}
  per_layer = PER_LAYER + tuple(loss.name for loss in losses.LOSSES if loss.monitor)
  return {
      **{f'moe/{loss.name}': jnp.mean(aux[loss.name]) for loss in losses.LOSSES
         if loss.name in aux},
      # Routed experts per token (variable with null slots): mean, and the distribution of
      # each layer ([layers, K + 1] shares of the tokens using 0 .. K experts).
      'moe/active_experts': jnp.mean(aux['active_experts']),
      'moe/active_experts_hist': aux['active_experts_hist'],
      'moe/zero_expert_fraction': jnp.mean(aux['zero_expert_fraction']),
      'moe/max_vio': jnp.mean(aux['max_vio']),
      'moe/cv': jnp.mean(aux['cv']),
      'moe/router_entropy': jnp.mean(aux['router_entropy']),
      'moe/dropped_fraction': jnp.mean(aux['dropped_fraction']),
      'moe/expert_load': aux['expert_load'],  # [layers, N]
      # The same statistics per MoE layer ([layers] each).
      **{f'moe/per_layer/{k}': aux[k] for k in per_layer},
  }


# The routing statistics logged per MoE layer (the monitored losses are too).
PER_LAYER = ('max_vio', 'cv', 'router_entropy', 'dropped_fraction', 'zero_expert_fraction',
             'active_experts')


# The jitted programs of the Trainers made in this process, by config (the seed aside: it is an
# argument of the train step) and mesh. The runs of an experiment's seeds, opened one after
# another in one process, trace and compile their programs once.
_PROGRAMS: collections.OrderedDict = collections.OrderedDict()
_PROGRAMS_KEPT = 8


def _programs_key(config, mesh) -> tuple:
  c = copy.deepcopy(config)
  c.seed = 0
  return str(c), mesh


class Trainer:
  """Builds the model, its sharded state and the compiled steps for one config and mesh."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    self.config, self.mesh = config, mesh
    model_cfg = ml_collections.FrozenConfigDict(config.model.to_dict())
    self.model = Transformer(model_cfg, train=True)
    self.eval_model = Transformer(model_cfg, train=False)
    self.tx = make_optimizer(config.train, config.model.moe.router.freeze)
    self.batch_sharding = sharding.batch_sharding(mesh)
    seq = config.data.seq_len
    self._dummy = jnp.zeros((config.train.batch_size, seq), jnp.int32)
    with self.context():
      # The key is made inside eval_shape: an eager jax.random.key under a mesh of
      # compile-only devices (moejax.compile) has nowhere to run.
      abstract = jax.eval_shape(lambda: self._init_boxed(jax.random.key(0)))
      self.state_sharding = sharding.logical_shardings(abstract, mesh)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.unbox(abstract), self.state_sharding)
    rep = self._replicated = sharding.replicated(mesh)
    key = _programs_key(config, mesh)
    if key in _PROGRAMS:  # another seed of the same run: its programs, already compiled
      _PROGRAMS.move_to_end(key)
      self._init, self._train_step, self._eval_step = _PROGRAMS[key]
      return
    self._init = jax.jit(lambda rng: nn.unbox(self._init_boxed(rng)),
                         out_shardings=self.state_sharding)
    self._train_step = jax.jit(self._train_step_fn, donate_argnums=0,
                               in_shardings=(self.state_sharding, self.batch_sharding, rep),
                               out_shardings=(self.state_sharding, rep))
    self._eval_step = jax.jit(self._eval_step_fn,
                              in_shardings=(self.state_sharding.params,
                                            self.state_sharding.model_state, self.batch_sharding),
                              out_shardings=rep)
    _PROGRAMS[key] = (self._init, self._train_step, self._eval_step)
    while len(_PROGRAMS) > _PROGRAMS_KEPT:
      _PROGRAMS.popitem(last=False)

  @contextlib.contextmanager
  def context(self):
    """Mesh and logical-axis rules, active while tracing so activation constraints apply."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      yield

  def _init_boxed(self, rng):
    variables = self.model.init({'params': rng, 'router': rng}, self._dummy)
    params = variables['params']
    model_state = {k: v for k, v in variables.items() if k != 'params'}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params), model_state=model_state)

  def init(self, seed: int) -> TrainState:
    with self.context():
      return self._init(jax.random.key(seed))

  def loss_fn(self, params, model_state, batch, rng):
    # The forward pass returns each MoE layer's loss-free bias update (from this step's global
    # expert counts) in the collection 'bias_updates'; the step applies it, never
    # differentiated.
    replay = batch.get('replay')  # [b, s, M, K]: route as recorded (data.replay)
    if replay is not None:
      b, s, m, k = replay.shape
      replay = jnp.transpose(replay, (2, 0, 1, 3)).reshape(m, b * s, k)
    (logits, aux), updates = self.model.apply(
        {'params': params, **model_state}, batch['inputs'], None, replay, rngs={'router': rng},
        mutable=['bias_updates', 'losses'])
    new_state = balance.apply_bias_updates(model_state, updates)
    ce = cross_entropy(logits, batch['targets'])
    moe_loss = jnp.sum(aux['loss']) if 'loss' in aux else 0.0
    metrics = {'train/ce_loss': ce, **moe_metrics(aux)}
    mtp_loss = mtp_total(aux, batch['targets'], self.config.model.mtp, metrics)
    # Layers' own losses (weighted where they are made): the indexers', one per MLA layer.
    layer_losses = jax.tree.leaves(updates.get('losses', {}))
    layer_loss = sum(jnp.sum(v) for v in layer_losses) if layer_losses else 0.0
    if layer_losses:  # the indexers' KL, unweighted, averaged over the layers
      metrics['train/indexer_loss'] = layer_loss / (
          sum(v.size for v in layer_losses) * self.config.model.mla.index_loss_weight)
    return ce + moe_loss + mtp_loss + layer_loss, (metrics, new_state)

  def _train_step_fn(self, state: TrainState, batch, seed):
    # The seed is an argument, not a constant of the program: every seed runs one program.
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    (loss, (metrics, model_state)), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(
        state.params, state.model_state, batch, rng)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm, param_norm = optax.tree.norm(grads), optax.tree.norm(params)
    # The divergence guard: a step whose loss, gradients or new parameters are not finite
    # leaves the state as it was (the step counter still advances past its batch); the loop
    # reads `train/finite` and stops, skips or rolls back (config.train.nonfinite).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    metrics = {'train/loss': loss, **metrics, 'train/grad_norm': grad_norm,
               'train/param_norm': param_norm, 'train/finite': finite,
               'train/lr': learning_rate(self.config.train)(state.step)}
    return TrainState(step=state.step + 1, params=keep(params, state.params),
                      opt_state=keep(opt_state, state.opt_state),
                      model_state=keep(model_state, state.model_state)), metrics

  def _eval_step_fn(self, params, model_state, batch):
    logits, aux = self.eval_model.apply({'params': params, **model_state}, batch['inputs'])
    out = {'eval/loss': cross_entropy(logits, batch['targets']),
           # each sequence's mean loss [B]: the evaluation's standard error comes from them
           'eval/row_loss': row_cross_entropy(logits, batch['targets'])}
    if aux:
      out['expert_load'] = aux['expert_load']
      out['dropped_fraction'] = jnp.mean(aux['dropped_fraction'])
      out['active_experts'] = aux['active_experts']  # [layers]
    return out

  def train_step(self, state, batch):
    with self.context():
      return self._train_step(state, self.device_batch(batch), self._seed())

  def _seed(self):
    return jax.device_put(jnp.asarray(self.config.seed, jnp.uint32), self._replicated)

  def lower_train_step(self, state, batch):
    """The train step lowered for (abstract) state and batch, as train_step runs it."""
    seed = jax.ShapeDtypeStruct((), jnp.uint32, sharding=self._replicated)
    with self.context():
      return self._train_step.lower(state, batch, seed)

  def eval_step(self, state: TrainState, batch):
    with self.context():
      return self._eval_step(state.params, state.model_state, self.device_batch(batch))

  def device_batch(self, local_batch: dict) -> dict:
    """Host numpy rows of this process -> global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local_batch.items()}
