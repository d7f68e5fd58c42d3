"""The training loop: resume, train, evaluate, log, checkpoint, plot."""
from __future__ import annotations

import os
import time

import jax
import numpy as np

from moejax import config as config_lib
from moejax.data import pipeline
from moejax.parallel import sharding
from moejax.training.checkpoint import Checkpointer
from moejax.training.metrics import MetricWriter, plot_expert_load
from moejax.training.step import Trainer


def evaluate(trainer: Trainer, state, batches) -> dict:
  losses, loads, dropped = [], [], []
  for b in batches:
    out = jax.device_get(trainer.eval_step(state, b))
    losses.append(out['eval/loss'])
    if 'expert_load' in out:
      loads.append(out['expert_load'])
      dropped.append(out['dropped_fraction'])
  result = {'eval/loss': float(np.mean(losses))}
  if loads:
    # Every batch routes the same number of tokens, so the mean of per-batch load shares is
    # the load share over the whole evaluation set.
    load = np.mean(loads, axis=0)  # [layers, N]
    vio = (load.max(-1) - load.mean(-1)) / load.mean(-1)
    result['eval/max_vio_global'] = float(vio.mean())
    result['eval/per_layer/max_vio_global'] = vio.tolist()
    result['eval/dropped_fraction'] = float(np.mean(dropped))
  return result


def train(config, workdir: str) -> dict:
  """Train (or resume) the run in workdir. Returns the last logged metrics."""
  mesh_sizes = config_lib.validate(config, jax.device_count())  # before anything compiles
  os.makedirs(workdir, exist_ok=True)
  t = config.train
  checkpointer = Checkpointer(workdir, t.keep_checkpoints)
  latest = checkpointer.latest_step()
  if latest is not None:
    checkpointer.check_compatible(latest, config.to_dict())

  splits = pipeline.load_splits(config.data, config.seed)
  mesh = sharding.make_mesh(mesh_sizes)
  trainer = Trainer(config, mesh)
  train_iter = iter(pipeline.train_dataset(splits.train, t.batch_size, config.seed))
  val_batches = pipeline.eval_batches(splits.val, t.batch_size, t.eval_batches)

  if latest is not None:
    state, data_state = checkpointer.restore(latest, trainer.abstract_state)
    train_iter.set_state(data_state)
  else:
    state = trainer.init(config.seed)
  start = int(jax.device_get(state.step))

  is_main = jax.process_index() == 0
  writer = MetricWriter(workdir, enabled=is_main, resume_step=start if latest is not None else None)
  if start == 0:
    writer.write(0, {
        'data/unigram_entropy_val': pipeline.unigram_entropy(splits.val.tokens),
        'data/train_tokens': len(splits.train.tokens),
        'data/val_tokens': len(splits.val.tokens),
        'data/train_files': splits.num_train_files, 'data/val_files': splits.num_val_files,
        'train/routing_causal': float(config_lib.routing_is_causal(config.model, train=True)),
        'eval/routing_causal': float(config_lib.routing_is_causal(config.model, train=False))})

  eval_causal = float(config_lib.routing_is_causal(config.model, train=False))
  tokens_per_step = t.batch_size * config.data.seq_len
  bar = None
  if t.progress and is_main:
    from tqdm import tqdm
    bar = tqdm(total=t.steps, initial=start, desc='train', unit='step', dynamic_ncols=True)
  last, tick, ticked_step = {}, time.perf_counter(), start
  for step in range(start + 1, t.steps + 1):
    state, metrics = trainer.train_step(state, next(train_iter))
    if step % t.log_every == 0 or step == t.steps:
      metrics = jax.device_get(metrics)
      now = time.perf_counter()
      metrics['perf/tokens_per_sec'] = tokens_per_step * (step - ticked_step) / (now - tick)
      tick, ticked_step = now, step
      if step % t.eval_every == 0 or step == t.steps:
        metrics.update(evaluate(trainer, state, val_batches))
        metrics['eval/routing_causal'] = eval_causal
        tick = time.perf_counter()  # evaluation time does not count against training speed
      writer.write(step, metrics)
      last = {'step': step, **metrics}
      if bar is not None:
        bar.set_postfix(loss=f"{float(metrics['train/loss']):.3f}",
                        tok_s=f"{metrics['perf/tokens_per_sec']:.0f}")
    stopping = step == t.stop_after
    if step % t.checkpoint_every == 0 or step == t.steps or stopping:
      checkpointer.save(step, state, train_iter.get_state(), config.to_dict())
    if bar is not None:
      bar.update(1)
    if stopping:
      break
  if bar is not None:
    bar.close()
  checkpointer.wait()
  checkpointer.close()
  writer.close()
  if is_main:
    plot_expert_load(writer.path, os.path.join(workdir, 'expert_load.png'),
                     config_lib.moe_layer_ids(config.model))
  return last
