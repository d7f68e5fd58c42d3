"""The training loop: lock the workdir, resume from the newest intact checkpoint, train with
the divergence guard, evaluate, log, checkpoint, plot."""
from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np

from moejax import checks
from moejax.data import pipeline, tokenizer as tokenizers
from moejax.errors import ConfigError, Diverged, Preempted
from moejax.model.schedule import moe_layer_ids, routing_is_causal
from moejax.moe import losses
from moejax.parallel.mesh import dcn_shape
from moejax.training import workdir as workdirs
from moejax.training.checkpoint import Checkpointer
from moejax.training.guard import Guard
from moejax.training.lock import lock_workdir
from moejax.training.metrics import MetricWriter, plot_expert_load, read_metrics
from moejax.training.preemption import Preemption
from moejax.training.step import Trainer


def evaluate(trainer: Trainer, state, batches, bytes_per_token: float = 1.0) -> dict:
  """The evaluation metrics of the model over `batches`: loss (nats per token), its standard
  error over the sequences, perplexity, bits per byte and the routing statistics."""
  outs = jax.device_get([trainer.eval_step(state, b) for b in batches])  # dispatched at once
  rows = np.concatenate([np.atleast_1d(o['eval/row_loss']) for o in outs]) if outs and (
      'eval/row_loss' in outs[0]) else np.asarray([o['eval/loss'] for o in outs], np.float64)
  loss = float(np.mean(rows))
  result = {'eval/loss': loss, 'eval/perplexity': float(np.exp(loss)),
            'eval/bpb': pipeline.bits_per_byte(loss, bytes_per_token),
            # The standard error of that mean over the sequences (neighbouring sequences of one
            # document are correlated, so it is a lower bound).
            'eval/loss_se': float(np.std(rows, ddof=1) / np.sqrt(len(rows))) if len(rows) > 1
            else float('nan')}
  loads = [o['expert_load'] for o in outs if 'expert_load' in o]
  if loads:
    dropped = [o['dropped_fraction'] for o in outs]
    active = [o['active_experts'] for o in outs]
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
  """{name: pipeline.EvalSet} of every evaluation set: num_batches batches sampled across each
  validation split (0: the whole split)."""
  return {name: pipeline.eval_set(chunks, batch_size, num_batches)
          for name, chunks in splits.val.items()}


def evaluate_all(trainer: Trainer, state, sets: dict, weights: dict,
                 prefix: str = 'eval') -> dict:
  """Each named set's metrics as PREFIX/NAME/...; the main set's (or, for a mixture, the
  weight-averaged loss and bits per byte of its corpora's sets) as PREFIX/..., with the tokens
  and sequences evaluated."""
  out, mean = {}, {'eval/loss': 0.0, 'eval/bpb': 0.0}
  for name, es in sets.items():
    result = evaluate(trainer, state, es.batches, es.bytes_per_token)
    result['eval/tokens'], result['eval/sequences'] = es.tokens, es.sequences
    if name == '':
      out.update(result)
      continue
    out.update({k.replace('eval/', f'eval/{name}/', 1): v for k, v in result.items()
                if k in ('eval/loss', 'eval/bpb', 'eval/perplexity', 'eval/loss_se',
                         'eval/tokens')})
    if name in weights:
      for k in mean:
        mean[k] += weights[name] * result[k]
  if '' not in sets:
    out.update(mean, **{'eval/perplexity': float(np.exp(mean['eval/loss']))})
  if prefix != 'eval':
    out = {prefix + k[len('eval'):]: v for k, v in out.items()}
  return out


def _check_workdir(workdir: str):
  if '://' in workdir:
    raise ConfigError(f'--workdir={workdir}: a URL, not a folder; mount the bucket or share on '
                      'every host (e.g. Cloud Storage FUSE, NFS) and give the mounted path')
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'--workdir={workdir} is a file; give a directory (new or of this run)')


def _make_workdir(workdir: str):
  _check_workdir(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f'--workdir={workdir}: cannot create it ({e.strerror})') from None


def train(config, workdir: str) -> dict:
  """Train (or resume) the run in workdir. Returns the last logged metrics ('finished': True
  when the run had already finished and nothing was done)."""
  sizes = checks.validate(config, jax.device_count())  # before anything compiles
  dcn_shape(config.mesh, sizes, jax.devices())  # and the slices or hosts the mesh spans
  tokenizers.check_training(config.data, workdir)
  _check_workdir(workdir)
  # Corpus and tokenizer errors, also before compiling (and before the workdir is made: a
  # refused run leaves no folder behind).
  splits = pipeline.load_splits(config.data, config.seed, config.model.vocab_size)
  if config.data.replay:  # train on a routing trace, routed as recorded
    from moejax.routes.trace import ReplayRows
    splits.train, splits.weights = [ReplayRows.open(config.data.replay, config)], [1.0]
  pipeline.check_batch(splits, config.train.batch_size, config.train.eval_batches)
  _make_workdir(workdir)
  if jax.process_index() == 0:
    tokenizers.copy_files(splits.tokenizer, workdir)  # generate reads it from the run
  with lock_workdir(workdir):
    return _Loop(config, workdir, splits).run()


def _finished_metrics(workdir: str, step: int) -> dict:
  """The last metrics of a run that had already reached train.steps."""
  path = os.path.join(workdir, 'metrics.jsonl')
  rows = read_metrics(path) if os.path.exists(path) else []
  last = {}
  for key in ('train/loss', 'eval/loss'):  # the last training row, then the last evaluation
    last.update(next((r for r in reversed(rows) if key in r), {}))
  last['step'], last['finished'] = step, True
  return last


class _Loop:
  """One training run in its workdir: the state and the data iterator, the checkpoints, the
  metric sinks and the divergence guard."""

  def __init__(self, config, workdir: str, splits):
    self.config, self.workdir, self.splits, self.t = config, workdir, splits, config.train
    self.opened = workdirs.open_run(config)
    self.trainer = self.opened.trainer
    self.checkpointer = Checkpointer(workdir, self.t.keep_checkpoints)
    self.val_sets = eval_sets(splits, self.t.batch_size, self.t.eval_batches)
    self.guard = Guard(self.t)
    self.is_main = jax.process_index() == 0
    self.writer = None

  def resume(self):
    """The step of the newest intact checkpoint (None: a fresh start); sets the state and the
    data iterator to it."""
    t, splits = self.t, self.splits
    self.data = iter(pipeline.train_dataset(splits.train, t.batch_size, self.config.seed,
                                            splits.weights))
    restored = workdirs.restore(self.opened, self.checkpointer, check_config=True, move=True)
    if restored is None:
      self.state = self.trainer.init(self.config.seed)
      return None
    step, self.state, data_state = restored
    self.data.set_state(data_state)
    self.guard.last_saved = step  # a restore is no progress: the rollback count stays
    return step

  def rollback(self, bad_step: int) -> int:
    """Back to the newest intact checkpoint; its batches up to bad_step are skipped."""
    self.checkpointer.wait()
    step = self.resume() or 0
    for _ in range(bad_step - step):
      next(self.data)
    self.writer.truncate(step)
    print(f'warning: step {bad_step} was not finite: rolled back to step {step}, skipping '
          f'batches {step + 1}-{bad_step} (train.nonfinite=rollback)', file=sys.stderr)
    return step

  def check(self, step: int, metrics) -> bool:
    """The guard's verdict on a step (False: roll back); a run that must stop gets the
    diverged step's row, NaN and all, before Diverged propagates."""
    try:
      return self.guard.ok(step, metrics)
    except Diverged:
      self.writer.write(step, jax.device_get(metrics))
      raise

  def final_evaluation(self) -> dict:
    """The end of the run: the validation sets again, on train.final_eval_batches batches
    sampled across each split (0: the whole split), as final/... metrics."""
    sets = eval_sets(self.splits, self.t.batch_size, self.t.final_eval_batches)
    return evaluate_all(self.trainer, self.state, sets, self.splits.val_weights, 'final')

  def _first_row(self):
    """Step 0's row: what the data is, and whether the routing is causal."""
    splits, m = self.splits, self.config.model
    val = next(iter(splits.val.values()))
    self.writer.write(0, {
        'data/unigram_entropy_val': pipeline.unigram_entropy(val.tokens),
        'data/train_tokens': sum(c.num_tokens for c in splits.train),
        'data/val_tokens': sum(len(c.stream) for c in splits.val.values()),
        'data/bytes_per_token_val': val.bytes_per_token,
        'data/train_docs': splits.num_train_docs, 'data/val_docs': splits.num_val_docs,
        'train/routing_causal': float(routing_is_causal(m, train=True)),
        'eval/routing_causal': float(routing_is_causal(m, train=False))})

  def run(self) -> dict:
    restored = self.resume()
    if restored is not None and restored >= self.t.steps:
      self.checkpointer.close()  # finished (its last checkpoint verified): nothing to do
      return _finished_metrics(self.workdir, restored)
    start = int(jax.device_get(self.state.step))
    if restored is not None and self.is_main:
      print(f'resuming from checkpoint step {restored}', file=sys.stderr)
    wandb = None
    if self.is_main and self.t.wandb_project:
      from moejax.training.wandb_writer import WandbWriter
      wandb = WandbWriter(self.workdir, self.config)
    self.writer = MetricWriter(self.workdir, enabled=self.is_main,
                               resume_step=-1 if restored is None else restored,
                               config_text=str(self.config), wandb=wandb)
    if start == 0:
      self._first_row()
    bar = None
    if self.t.progress and self.is_main:
      from tqdm.auto import tqdm
      bar = tqdm(total=self.t.steps, initial=start, desc='train', unit='step',
                 dynamic_ncols=True)
    self.preemption = Preemption()
    try:
      last = self._steps(start, bar)
    finally:
      # Also when the run stops (divergence, an error, Ctrl-C, a preemption): a checkpoint
      # being written in the background is finished, never left half-written.
      self.preemption.close()
      if bar is not None:
        bar.close()
      self.checkpointer.wait()
      self.checkpointer.close()
      self.writer.close()
    if 'preempted' in last:
      raise Preempted(f"preempted at step {last['preempted']}: its checkpoint is saved in "
                      f'{self.workdir}/checkpoints; resume with the same command')
    if self.is_main:
      plot_expert_load(self.writer.path, os.path.join(self.workdir, 'expert_load.png'),
                       moe_layer_ids(self.config.model))
    return last

  def _steps(self, start: int, bar) -> dict:
    """Train from `start` to train.steps (or stop_after); returns the last logged metrics."""
    t, config = self.t, self.config
    eval_causal = float(routing_is_causal(config.model, train=False))
    tokens_per_step = t.batch_size * config.data.seq_len
    perf = Throughput(config)
    last, tick, ticked_step = {}, time.perf_counter(), start
    save_wait = 0.0  # seconds the loop spent in checkpoint saves since the last logged row
    step, pending = start, None  # pending: (step, metrics) whose finite flag is still unread
    while step < t.steps:
      step += 1
      self.state, metrics = self.trainer.train_step(self.state, next(self.data))
      # The previous step's flag is read while this step runs (no pipeline stall); a step
      # that logs or saves is read at once.
      unread = [pending] if pending is not None else []
      pending = (step, metrics)
      preempted = self.preemption.reached(step) and step < t.steps
      stopping = step == t.stop_after or preempted
      logging = step % t.log_every == 0 or step == t.steps or preempted
      saving = step % t.checkpoint_every == 0 or step == t.steps or stopping
      if logging or saving:
        unread.append(pending)
        pending = None
      bad = next((s for s, m in unread if not self.check(s, m)), None)
      if bad is not None:
        step, pending = self.rollback(bad), None
        continue
      if logging:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        metrics['perf/tokens_per_sec'] = tokens_per_step * (step - ticked_step) / (now - tick)
        metrics.update(perf.of(metrics['perf/tokens_per_sec']))
        tick, ticked_step = now, step
        if self.guard.skipped:
          metrics['train/skipped_steps'] = self.guard.skipped
        if save_wait:  # the synchronous part of a save (the rest is written in the background)
          metrics['perf/checkpoint_wait_s'], save_wait = save_wait, 0.0
        if step % t.eval_every == 0 or step == t.steps:
          metrics.update(evaluate_all(self.trainer, self.state, self.val_sets,
                                      self.splits.val_weights))
          metrics['eval/routing_causal'] = eval_causal
        if step == t.steps and t.final_eval_batches >= 0:
          metrics.update(self.final_evaluation())
          tick = time.perf_counter()  # evaluation time does not count against training speed
        self.writer.write(step, metrics)
        last = {'step': step, **metrics}
        if bar is not None:
          bar.set_postfix(loss=f"{float(metrics['train/loss']):.3f}",
                          tok_s=f"{metrics['perf/tokens_per_sec']:.0f}")
      if saving:
        began = time.perf_counter()
        self.checkpointer.save(step, self.state, self.data.get_state(), config.to_dict())
        save_wait += time.perf_counter() - began
        self.guard.saved(step)
      if bar is not None:
        bar.n = step
        bar.refresh()
      if stopping:
        if preempted:
          last = {**last, 'step': step, 'preempted': step}
        break
    return last


class Throughput:
  """Model FLOPs per second per device and utilisation (MFU) from the tokens per second:
  training FLOPs per token (moejax/costs/flops.py) x tokens/s / devices, against the device's
  dense bf16 peak (train.peak_tflops, else the table by device kind; unknown on CPU)."""

  def __init__(self, config):
    from moejax.costs.flops import flops_per_token, peak_tflops
    self.flops = flops_per_token(config.model, config.data.seq_len)['train']
    self.devices = jax.device_count()
    self.peak = peak_tflops(jax.devices()[0].device_kind, config.train.peak_tflops)

  def of(self, tokens_per_sec: float) -> dict:
    tflops = self.flops * tokens_per_sec / self.devices / 1e12
    out = {'perf/tflops_per_device': tflops}
    if self.peak:
      out['perf/mfu'] = tflops / self.peak
    return out


def summary_line(last: dict, config) -> str:
  """The command's last line: the losses that are on, evaluation, speed."""
  if last.get('finished'):
    return (f"finished: this run already reached step {last['step']} (train.steps="
            f'{config.train.steps}); raise --config.train.steps to train further. Last: '
            + _pairs(last, config))
  return f"final: step {last.get('step')}: " + _pairs(last, config)


def _pairs(last: dict, config) -> str:
  keys = ['train/loss', 'train/ce_loss']
  keys += [f'moe/{loss.name}' for loss in losses.LOSSES if loss.on(config.model.moe.balance)]
  if config.model.mtp.depth:
    keys.append('train/mtp_loss')
  keys += ['moe/max_vio', 'moe/dropped_fraction', 'train/skipped_steps', 'eval/loss', 'eval/bpb',
           'eval/max_vio_global', 'final/loss', 'final/loss_se', 'final/bpb', 'final/tokens']
  if last.get('eval/active_experts', config.model.moe.num_experts_per_tok) != (
      config.model.moe.num_experts_per_tok):
    keys.append('eval/active_experts')  # routed experts per token, when not always K
  keys += ['perf/tokens_per_sec', 'perf/tflops_per_device', 'perf/mfu']
  return ', '.join(f'{k} {float(last[k]):.4g}' for k in keys if k in last
                   and getattr(last[k], 'ndim', 0) == 0 and not isinstance(last[k], list))


def outputs_line(workdir: str) -> str:
  """Where a run's outputs are, for the command's last line."""
  plot = os.path.join(workdir, 'expert_load.png')
  return (f"outputs: {os.path.join(workdir, 'metrics.jsonl')}"
          + (f', {plot}' if os.path.exists(plot) else '') +
          f", checkpoints in {os.path.join(workdir, 'checkpoints')}; TensorBoard: tensorboard "
          f"--logdir {os.path.join(workdir, 'tensorboard')}; sample: python -m moejax.generate "
          f'--workdir={workdir}')
