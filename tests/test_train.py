"""End-to-end training: metrics, plots, exact resume, and refusing a foreign checkpoint."""
import os
import shutil

import numpy as np
import pytest

from moejax.config import ConfigError
from moejax.training.loop import train
from moejax.training.metrics import read_metrics

from conftest import tiny_config as _tiny_config


def _losses(workdir):
  return {r['step']: r['train/loss'] for r in read_metrics(os.path.join(workdir, 'metrics.jsonl'))
          if 'train/loss' in r}


def tiny_config():
  """With the loss-free bias on, so resuming must also restore the router biases."""
  c = _tiny_config()
  c.model.moe.balance.bias_update_rate = 1e-2
  return c


def _logging_to_wandb(c):
  """The resumed run also logs to Weights & Biases, offline (when wandb is installed)."""
  try:
    import wandb  # noqa: F401
  except ImportError:
    return c
  c.train.wandb_project, c.train.wandb_mode = 'moejax-tests', 'offline'
  return c


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """One uninterrupted 6-step run, and one stopped after step 4 then resumed to step 6 (logging
  to W&B offline as well)."""
  full = str(tmp_path_factory.mktemp('full'))
  train(tiny_config(), full)
  resumed = str(tmp_path_factory.mktemp('resumed'))
  c = _logging_to_wandb(tiny_config())
  c.train.stop_after = 4
  train(c, resumed)
  assert max(_losses(resumed)) == 4
  train(_logging_to_wandb(tiny_config()), resumed)
  return full, resumed


def _wandb_records(path: str):
  """The records of a W&B run file (.wandb): a 7-byte header, then LevelDB's log format (32 KiB
  blocks of chunks: crc32, length, type: full / first / middle / last), each record a
  wandb_internal Record message."""
  import struct
  from wandb.proto import wandb_internal_pb2
  data, pos, whole, block = open(path, 'rb').read(), 7, b'', 32768
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
    chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
    whole = chunk if kind in (1, 2) else whole + chunk
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(whole)
      yield record


def test_wandb_offline_logs_every_row_once_in_one_run_across_the_resume(runs):
  """What W&B holds (read back from its offline files) is metrics.jsonl: every logged step
  once, the same numbers, per-layer lists one scalar per MoE layer, the expert loads as
  histograms, the run's config; both sessions of the resumed run log into one W&B run id."""
  pytest.importorskip('wandb')
  import glob
  import json
  _, resumed = runs
  run_id = open(os.path.join(resumed, 'wandb_id')).read().strip()
  files = sorted(glob.glob(os.path.join(resumed, 'wandb', 'offline-run-*', 'run-*.wandb')))
  assert len(files) == 2 and all(f.endswith(f'run-{run_id}.wandb') for f in files)
  history, configs = {}, []
  for path in files:
    for record in _wandb_records(path):
      kind = record.WhichOneof('record_type')
      if kind == 'history':
        row = {}
        for item in record.history.item:  # a histogram's fields: nested keys (name, field)
          *outer, last = [item.key] if item.key else list(item.nested_key)
          place = row
          for name in outer:
            place = place.setdefault(name, {})
          place[last] = json.loads(item.value_json)
        assert row['_step'] not in history  # no step twice
        history[row['_step']] = row
      elif kind == 'run':
        configs.append({i.key: json.loads(i.value_json) for i in record.run.config.update})
  rows = read_metrics(os.path.join(resumed, 'metrics.jsonl'))
  assert sorted(history) == [r['step'] for r in rows] == [0, 1, 2, 3, 4, 5, 6]
  for r in rows:
    got = history[r['step']]
    for k, v in r.items():
      if isinstance(v, (int, float)) and k != 'step':
        assert got[k] == pytest.approx(float(v), rel=1e-12, nan_ok=True), (r['step'], k)
      elif '/per_layer/' in k:
        assert [got[f'{k}/moe_layer_{i}'] for i in range(len(v))] == pytest.approx(v)
      elif k.endswith('expert_load'):
        hist = got[f'{k}/moe_layer_1']
        assert hist['_type'] == 'histogram' and hist['values'] == pytest.approx(v[1])
  assert len(configs) == 2 and all(c['train']['wandb_mode'] == 'offline' and
                                   c['model']['moe']['num_experts'] == 8
                                   for c in configs)


@pytest.mark.slow  # a second mesh compiled (restoring onto any mesh: test_reliability.py too)
def test_checkpoint_restores_under_another_mesh(runs, tmp_path):
  """The uninterrupted run's step-3 checkpoint, written on (data=8) with every expert on every
  device, resumed on (data=4, expert=2) with the experts split in two: the same losses for
  steps 4-6. Tolerance 1e-5 relative: the meshes sum sharded matmuls in different orders
  (float32 rounding); a wrong restore gives O(1) differences."""
  full, _ = runs
  copy = str(tmp_path / 'run')
  shutil.copytree(full, copy)
  shutil.rmtree(os.path.join(copy, 'checkpoints', '6'))  # resume from step 3
  c = tiny_config()
  c.mesh.data, c.mesh.expert = 4, 2
  train(c, copy)
  got, want = _losses(copy), _losses(full)
  assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([got[s] for s in (4, 5, 6)], [want[s] for s in (4, 5, 6)],
                             rtol=1e-5)


def test_resume_reproduces_uninterrupted_losses(runs):
  full, resumed = runs
  a, b = _losses(full), _losses(resumed)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
  for step in a:  # same program, same data, same state: bit-identical
    assert a[step] == b[step], step


def test_metrics_plot_and_tensorboard(runs):
  full, _ = runs
  rows = read_metrics(os.path.join(full, 'metrics.jsonl'))
  assert rows[0]['step'] == 0 and rows[0]['data/unigram_entropy_val'] > 2
  last = rows[-1]
  for key in ('train/loss', 'train/ce_loss', 'moe/aux_loss', 'moe/z_loss', 'moe/max_vio',
              'moe/dropped_fraction', 'eval/loss', 'eval/max_vio_global'):
    assert np.isfinite(last[key]), key
  load = np.asarray(last['moe/expert_load'])
  assert load.shape == (2, 8)  # two MoE layers, eight experts
  np.testing.assert_allclose(load.sum(-1), 1.0, rtol=1e-5)
  assert [r['step'] for r in rows if 'eval/loss' in r] == [3, 6]
  # The time step 3's checkpoint held the loop, on the next row (step 6's save is the last).
  waits = {r['step']: r['perf/checkpoint_wait_s'] for r in rows if 'perf/checkpoint_wait_s' in r}
  assert list(waits) == [4] and 0 < waits[4] < 60
  assert len(last['moe/per_layer/max_vio']) == 2 and len(last['eval/per_layer/max_vio_global']) == 2
  assert np.mean(last['moe/per_layer/max_vio']) == pytest.approx(last['moe/max_vio'], rel=1e-5)
  assert last['eval/routing_causal'] == 1.0
  with open(os.path.join(full, 'expert_load.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  events = os.listdir(os.path.join(full, 'tensorboard'))
  assert any(e.startswith('events.out.tfevents') for e in events)
  assert sorted(os.listdir(os.path.join(full, 'checkpoints'))) == ['3', '6']


def test_incompatible_checkpoint_is_refused_and_left_intact(runs):
  full, _ = runs
  metrics_before = open(os.path.join(full, 'metrics.jsonl')).read()
  c = tiny_config()
  c.model.d_model = 64
  c.train.steps = 9
  with pytest.raises(ConfigError) as e:
    train(c, full)
  assert 'config.model.d_model was 32, now 64' in str(e.value)
  assert 'new --workdir' in str(e.value)
  assert open(os.path.join(full, 'metrics.jsonl')).read() == metrics_before
  assert sorted(os.listdir(os.path.join(full, 'checkpoints'))) == ['3', '6']


def test_finished_run_is_not_retrained(runs):
  full, _ = runs
  before = _losses(full)
  train(tiny_config(), full)
  assert _losses(full) == before


def test_generate_from_checkpoint(runs, capsys, tmp_path):
  from moejax import generate
  full, _ = runs
  args = ['--workdir', full, '--prompt', 'def ', '--max_new_tokens', '6', '--seed', '3']
  assert generate.main(args) == 0
  first = capsys.readouterr().out
  assert first.startswith('def ')
  assert generate.main(args) == 0
  assert capsys.readouterr().out == first  # same seed, same text
  assert generate.main(['--workdir', full + 'x']) == 2  # a mistyped run: the real one named
  err = capsys.readouterr().err
  assert 'no such folder; runs with checkpoints nearby: ' in err and full in err
  os.makedirs(tmp_path / 'empty')
  assert generate.main(['--workdir', str(tmp_path / 'empty')]) == 2
  assert 'no checkpoint' in capsys.readouterr().err


def test_stop_after_checkpoints_that_step_and_retention_keeps_the_newest(runs):
  """The resumed run stopped after step 4 (train.stop_after): it wrote a checkpoint there,
  and after resuming to 6 with keep_checkpoints=3 the newest three remain: 3, 4, 6."""
  _, resumed = runs
  assert sorted(os.listdir(os.path.join(resumed, 'checkpoints')), key=int) == ['3', '4', '6']


def test_sigterm_checkpoints_the_step_in_flight_and_resumes_exactly(runs, tmp_path,
                                                                    monkeypatch, capsys):
  """A SIGTERM while step 2 trains (sent from inside it): the run finishes step 2, logs it
  (log_every is 3: a row only a preemption writes), saves a checkpoint there, gives SIGTERM
  back, and stops with Preempted (exit code 4 and one line from the command); the lock is
  free, and the same command resumes to the uninterrupted run's losses, bit for bit."""
  import signal
  from moejax import main
  from moejax.training.lock import read_holder
  from moejax.training.step import Trainer
  full, _ = runs
  calls, real = [], Trainer.train_step

  def step_then_signal(self, state, batch):
    calls.append(1)
    if len(calls) == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(self, state, batch)
  monkeypatch.setattr(Trainer, 'train_step', step_then_signal)
  before = signal.getsignal(signal.SIGTERM)
  workdir = str(tmp_path / 'run')
  config = tmp_path / 'tiny.py'
  config.write_text('import sys\nsys.path.insert(0, %r)\nfrom test_train import tiny_config\n'
                    'def get_config():\n  c = tiny_config()\n  c.train.log_every = 3\n'
                    '  return c\n' % os.path.dirname(__file__))
  assert main.main([f'--config={config}', f'--workdir={workdir}']) == 4
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == (f'preempted at step 2: its checkpoint is saved in {workdir}/checkpoints; '
                     'resume with the same command'), err
  assert signal.getsignal(signal.SIGTERM) == before
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2']
  assert sorted(_losses(workdir)) == [2]
  assert read_holder(os.path.join(workdir, 'lock')) == {}  # released: no holder to wait for
  monkeypatch.setattr(Trainer, 'train_step', real)
  assert main.main([f'--config={config}', f'--workdir={workdir}']) == 0
  a, b = _losses(full), _losses(workdir)
  assert sorted(b) == [2, 3, 6] and all(a[s] == b[s] for s in b)


def test_logged_learning_rate_is_the_one_applied(runs):
  """Step s applies the schedule at optimizer count s - 1 (0 at the first step): lr 3e-3,
  warmup 2, 6 steps, end ratio .1 -> 0, 1.5e-3, 3e-3, then a cosine over counts 2-6:
  count 3: 3e-4 + 2.7e-3 * .5 (1 + cos(pi / 4)) = 2.604594e-3; count 4: 1.65e-3;
  count 5: 6.95406e-4."""
  full, _ = runs
  rows = {r['step']: r['train/lr'] for r in read_metrics(os.path.join(full, 'metrics.jsonl'))
          if 'train/lr' in r}
  c = np.cos(np.pi / 4)
  want = [0.0, 1.5e-3, 3e-3, 3e-4 + 1.35e-3 * (1 + c), 1.65e-3, 3e-4 + 1.35e-3 * (1 - c)]
  np.testing.assert_allclose([rows[s] for s in range(1, 7)], want, rtol=1e-5, atol=1e-9)


def test_seeds_of_one_config_share_compiled_programs_and_still_differ():
  """The seed is an argument of the train step: Trainers of one config on one mesh (the seeds
  of an experiment's cell) share the jitted programs; the routing noise follows each run's own
  seed (router jitter on: the same state and batch give another step under another seed, the
  same step under the same); another config or mesh gets programs of its own."""
  import copy
  import jax
  from conftest import trainer_on
  c = _tiny_config()
  c.model.moe.router.jitter = 0.5
  first = trainer_on(copy.deepcopy(c), dict(data=1, fsdp=1, expert=1, tensor=1))
  c.seed = 7
  other_seed = trainer_on(copy.deepcopy(c), dict(data=1, fsdp=1, expert=1, tensor=1))
  assert other_seed._train_step is first._train_step and other_seed._eval_step is first._eval_step
  wider = copy.deepcopy(c)
  wider.model.moe.expert_ffn_dim = 32
  assert trainer_on(wider, dict(data=1, fsdp=1, expert=1, tensor=1))._train_step is not (
      first._train_step)
  assert trainer_on(copy.deepcopy(c), dict(data=2, fsdp=1, expert=1, tensor=1))._train_step is not (
      first._train_step)
  # The same config on another device (config.mesh alike: data=-1 takes what it is given).
  from moejax.parallel.mesh import make_mesh, mesh_shape
  from moejax.training.step import Trainer
  elsewhere = Trainer(first.config, make_mesh(mesh_shape(first.config.mesh, 1), jax.devices()[1:2]))
  assert elsewhere._train_step is not first._train_step
  rows = np.random.default_rng(0).integers(0, 256, (8, 17)).astype(np.int32)
  batch = {'inputs': rows[:, :-1], 'targets': rows[:, 1:]}

  def loss(trainer):
    state = first.init(0)  # the same initial state for both seeds
    return float(jax.device_get(trainer.train_step(state, batch)[1]['train/loss']))
  assert loss(first) == loss(first) != loss(other_seed)
