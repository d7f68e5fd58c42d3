"""The training loop: lock the workdir, resume from the newest intact checkpoint, train with
the divergence guard, evaluate, log, checkpoint, plot."""
from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np

from moejax import config as config_lib
from moejax.data import pipeline, tokenizer as tokenizers
from moejax.parallel import sharding
from moejax.cli import Diverged
from moejax.config import ConfigError
from moejax.training.checkpoint import Checkpointer
from moejax.training.lock import WorkdirLock
from moejax.training.metrics import MetricWriter, plot_expert_load, read_metrics
from moejax.training.step import Trainer


def evaluate(trainer: Trainer, state, batches, bytes_per_token: float = 1.0) -> dict:
  losses, loads, dropped, active = [], [], [], []
  for b in batches:
    out = jax.device_get(trainer.eval_step(state, b))
    losses.append(out['eval/loss'])
    if 'expert_load' in out:
      loads.append(out['expert_load'])
      dropped.append(out['dropped_fraction'])
      active.append(out['active_experts'])
  loss = float(np.mean(losses))
  result = {'eval/loss': loss, 'eval/perplexity': float(np.exp(loss)),
            'eval/bpb': pipeline.bits_per_byte(loss, bytes_per_token)}
  if loads:
    # Every batch routes the same number of tokens, so the mean of per-batch load shares is
    # the load share over the whole evaluation set (up to the batches' different numbers of
    # routed choices, where null slots make it vary).
    load = np.mean(loads, axis=0)  # [layers, N]
    vio = (load.max(-1) - load.mean(-1)) / load.mean(-1)
    result['eval/max_vio_global'] = float(vio.mean())
    result['eval/per_layer/max_vio_global'] = vio.tolist()
    # Experts that received no token over the whole evaluation set, per MoE layer.
    dead = (load <= 0).sum(-1)
    result['eval/dead_experts'] = float(dead.mean())
    result['eval/per_layer/dead_experts'] = dead.tolist()
    result['eval/dropped_fraction'] = float(np.mean(dropped))
    # Routed experts per token over the evaluation set (mean over layers, and per layer).
    result['eval/active_experts'] = float(np.mean(active))
    result['eval/per_layer/active_experts'] = np.mean(active, axis=0).tolist()
  return result


def eval_sets(splits, batch_size: int, num_batches: int) -> dict:
  """{name: (batches, bytes per token)} of every evaluation set."""
  return {name: (pipeline.eval_batches(chunks, batch_size, num_batches), chunks.bytes_per_token)
          for name, chunks in splits.val.items()}


def evaluate_all(trainer: Trainer, state, sets: dict, weights: dict) -> dict:
  """Each named set's metrics as eval/NAME/...; the main set's (or, for a mixture, the
  weight-averaged loss and bits per byte of its corpora's sets) as eval/..."""
  out, mean = {}, {'eval/loss': 0.0, 'eval/bpb': 0.0}
  for name, (batches, bpt) in sets.items():
    result = evaluate(trainer, state, batches, bpt)
    if name == '':
      out.update(result)
      continue
    out.update({k.replace('eval/', f'eval/{name}/', 1): v for k, v in result.items()
                if k in ('eval/loss', 'eval/bpb', 'eval/perplexity')})
    if name in weights:
      for k in mean:
        mean[k] += weights[name] * result[k]
  if '' not in sets:
    out.update(mean, **{'eval/perplexity': float(np.exp(mean['eval/loss']))})
  return out


def _make_workdir(workdir: str):
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'--workdir={workdir} is a file; give a directory (new or of this run)')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f'--workdir={workdir}: cannot create it ({e.strerror})') from None


def train(config, workdir: str) -> dict:
  """Train (or resume) the run in workdir. Returns the last logged metrics ('finished': True
  when the run had already finished and nothing was done)."""
  mesh_sizes = config_lib.validate(config, jax.device_count())  # before anything compiles
  _make_workdir(workdir)
  # Corpus and tokenizer errors, also before compiling.
  splits = pipeline.load_splits(config.data, config.seed, config.model.vocab_size)
  pipeline.check_batch(splits, config.train.batch_size, config.train.eval_batches)
  if jax.process_index() == 0:
    tokenizers.copy_files(splits.tokenizer, workdir)  # generate reads it from the run
  with WorkdirLock(workdir, enabled=jax.process_index() == 0):
    return _train(config, workdir, mesh_sizes, splits)


def _finished_metrics(workdir: str, step: int) -> dict:
  """The last metrics of a run that had already reached train.steps."""
  path = os.path.join(workdir, 'metrics.jsonl')
  rows = read_metrics(path) if os.path.exists(path) else []
  last = {}
  for key in ('train/loss', 'eval/loss'):  # the last training row, then the last evaluation
    last.update(next((r for r in reversed(rows) if key in r), {}))
  last['step'], last['finished'] = step, True
  return last


class _Guard:
  """What the loop does with a step whose update the train step refused (not finite)."""

  def __init__(self, t):
    self.mode, self.limit = t.nonfinite, t.max_nonfinite
    self.in_a_row = self.rollbacks = self.skipped = 0
    self.last_saved = None

  def ok(self, step: int, metrics) -> bool:
    """False asks for a rollback; raises Diverged when the run must stop."""
    if bool(jax.device_get(metrics['train/finite'])):
      self.in_a_row = 0
      return True
    loss, norm = (float(jax.device_get(metrics[k])) for k in ('train/loss', 'train/grad_norm'))
    where = (f'step {step}: the loss ({loss}) or gradient norm ({norm}) is not finite; the '
             'update was not applied')
    saved = ('no checkpoint was written' if self.last_saved is None else
             f'the newest checkpoint is step {self.last_saved}')
    fix = 'lower train.lr or raise train.warmup_steps'
    if self.mode == 'stop':
      raise Diverged(f'{where} and the run stopped ({saved}, nothing non-finite was written). '
                     f'To go on: {fix}, or set train.nonfinite=skip or rollback')
    self.in_a_row += 1
    if self.mode == 'skip':
      self.skipped += 1
      if self.in_a_row > self.limit:
        raise Diverged(f'{where}; {self.in_a_row} steps in a row were not finite (more than '
                       f'train.max_nonfinite={self.limit}), so the run stopped ({saved}). {fix}')
      print(f'warning: {where}: batch skipped (train.nonfinite=skip)', file=sys.stderr)
      return True
    self.rollbacks += 1
    if self.rollbacks > self.limit:
      raise Diverged(f'{where}; {self.rollbacks - 1} rollbacks did not reach a new checkpoint '
                     f'(train.max_nonfinite={self.limit}), so the run stopped ({saved}). {fix}')
    return False

  def saved(self, step: int):
    self.last_saved, self.rollbacks = step, 0


def _train(config, workdir: str, mesh_sizes, splits) -> dict:
  t = config.train
  checkpointer = Checkpointer(workdir, t.keep_checkpoints)
  mesh = sharding.make_mesh(mesh_sizes)
  trainer = Trainer(config, mesh)
  val_sets = eval_sets(splits, t.batch_size, t.eval_batches)
  guard = _Guard(t)

  def resume():
    """(step, state, data iterator) of the newest intact checkpoint, or of a fresh start."""
    it = iter(pipeline.train_dataset(splits.train, t.batch_size, config.seed, splits.weights))
    restored = checkpointer.restore_intact(trainer.abstract_state, config.to_dict())
    if restored is None:
      return None, trainer.init(config.seed), it
    step, state, data_state = restored
    it.set_state(data_state)
    guard.last_saved = step  # a restore is no progress: the rollback count stays
    return step, state, it

  restored_step, state, train_iter = resume()
  if restored_step is not None and restored_step >= t.steps:
    checkpointer.close()  # finished (its last checkpoint verified): nothing to do
    return _finished_metrics(workdir, restored_step)
  start = int(jax.device_get(state.step))

  is_main = jax.process_index() == 0
  if restored_step is not None and is_main:
    print(f'resuming from checkpoint step {restored_step}', file=sys.stderr)
  writer = MetricWriter(workdir, enabled=is_main,
                        resume_step=-1 if restored_step is None else restored_step,
                        config_text=str(config))
  if start == 0:
    writer.write(0, {
        'data/unigram_entropy_val': pipeline.unigram_entropy(next(iter(splits.val.values()))
                                                             .tokens),
        'data/train_tokens': sum(len(c.stream) for c in splits.train),
        'data/val_tokens': sum(len(c.stream) for c in splits.val.values()),
        'data/bytes_per_token_val': next(iter(splits.val.values())).bytes_per_token,
        'data/train_docs': splits.num_train_docs, 'data/val_docs': splits.num_val_docs,
        'train/routing_causal': float(config_lib.routing_is_causal(config.model, train=True)),
        'eval/routing_causal': float(config_lib.routing_is_causal(config.model, train=False))})

  def rollback(bad_step: int):
    """Back to the newest intact checkpoint; its batches up to bad_step are skipped."""
    nonlocal train_iter
    checkpointer.wait()
    step, new_state, train_iter = resume()
    step = step or 0
    for _ in range(bad_step - step):
      next(train_iter)
    writer.truncate(step)
    print(f'warning: step {bad_step} was not finite: rolled back to step {step}, skipping '
          f'batches {step + 1}-{bad_step} (train.nonfinite=rollback)', file=sys.stderr)
    return step, new_state

  def check(step: int, metrics) -> bool:
    try:
      return guard.ok(step, metrics)
    except Diverged:
      writer.write(step, jax.device_get(metrics))  # the diverged step's row, NaN and all
      raise

  eval_causal = float(config_lib.routing_is_causal(config.model, train=False))
  tokens_per_step = t.batch_size * config.data.seq_len
  bar = None
  if t.progress and is_main:
    from tqdm.auto import tqdm
    bar = tqdm(total=t.steps, initial=start, desc='train', unit='step', dynamic_ncols=True)
  try:
    last, tick, ticked_step = {}, time.perf_counter(), start
    step, pending = start, None  # pending: (step, metrics) whose finite flag is still unread
    while step < t.steps:
      step += 1
      state, metrics = trainer.train_step(state, next(train_iter))
      # The previous step's guard flag is read while this step runs (no pipeline stall).
      if pending is not None and not check(*pending):
        step, state = rollback(pending[0])
        pending = None
        continue
      pending = (step, metrics)
      stopping = step == t.stop_after
      logging = step % t.log_every == 0 or step == t.steps
      saving = step % t.checkpoint_every == 0 or step == t.steps or stopping
      if logging or saving:
        if not check(*pending):
          step, state = rollback(step)
          pending = None
          continue
        pending = None
      if logging:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        metrics['perf/tokens_per_sec'] = tokens_per_step * (step - ticked_step) / (now - tick)
        tick, ticked_step = now, step
        if guard.skipped:
          metrics['train/skipped_steps'] = guard.skipped
        if step % t.eval_every == 0 or step == t.steps:
          metrics.update(evaluate_all(trainer, state, val_sets, splits.val_weights))
          metrics['eval/routing_causal'] = eval_causal
          tick = time.perf_counter()  # evaluation time does not count against training speed
        writer.write(step, metrics)
        last = {'step': step, **metrics}
        if bar is not None:
          bar.set_postfix(loss=f"{float(metrics['train/loss']):.3f}",
                          tok_s=f"{metrics['perf/tokens_per_sec']:.0f}")
      if saving:
        checkpointer.save(step, state, train_iter.get_state(), config.to_dict())
        guard.saved(step)
      if bar is not None:
        bar.n = step
        bar.refresh()
      if stopping:
        break
  finally:
    # Also when the run stops (divergence, an error, Ctrl-C): a checkpoint being written in
    # the background is finished, never left half-written.
    if bar is not None:
      bar.close()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
  if is_main:
    plot_expert_load(writer.path, os.path.join(workdir, 'expert_load.png'),
                     config_lib.moe_layer_ids(config.model))
  return last


# Each loss metric and the config field that turns it on (the summary lists only those on).
_LOSSES = (('moe/aux_loss', 'model.moe.balance.aux_loss_weight'),
           ('moe/z_loss', 'model.moe.balance.z_loss_weight'),
           ('moe/seq_aux_loss', 'model.moe.balance.seq_aux_loss_weight'),
           ('moe/device_loss', 'model.moe.balance.device_loss_weight'),
           ('moe/comm_loss', 'model.moe.balance.comm_loss_weight'),
           ('moe/importance_loss', 'model.moe.balance.importance_loss_weight'),
           ('moe/load_loss', 'model.moe.balance.load_loss_weight'),
           ('moe/entropy_loss', 'model.moe.balance.entropy_loss_weight'),
           ('moe/l1_loss', 'model.moe.balance.l1_target'),
           ('train/mtp_loss', 'model.mtp.depth'))


def summary_line(last: dict, config) -> str:
  """The command's last line: the losses that are on, evaluation, speed."""
  if last.get('finished'):
    return (f"finished: this run already reached step {last['step']} (train.steps="
            f'{config.train.steps}); raise --config.train.steps to train further. Last: '
            + _pairs(last, config))
  return f"final: step {last.get('step')}: " + _pairs(last, config)


def _pairs(last: dict, config) -> str:
  keys = ['train/loss', 'train/ce_loss']
  for key, field in _LOSSES:
    if config_lib._get(config, field):
      keys.append(key)
  keys += ['moe/max_vio', 'moe/dropped_fraction', 'train/skipped_steps', 'eval/loss', 'eval/bpb',
           'eval/max_vio_global']
  if last.get('eval/active_experts', config.model.moe.num_experts_per_tok) != (
      config.model.moe.num_experts_per_tok):
    keys.append('eval/active_experts')  # routed experts per token, when not always K
  keys.append('perf/tokens_per_sec')
  return ', '.join(f'{k} {float(last[k]):.4g}' for k in keys if k in last
                   and getattr(last[k], 'ndim', 0) == 0 and not isinstance(last[k], list))
