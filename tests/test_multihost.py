"""A real multi-controller run: two processes on localhost, 4 CPU devices each, joined by
jax.distributed with gloo collectives, train the same steps as one process with 8 devices."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from moejax.training.loop import train
from moejax.training.metrics import read_metrics

from multihost_config import get_config

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _rows(workdir):
  return {r['step']: r for r in read_metrics(os.path.join(workdir, 'metrics.jsonl'))}


@pytest.fixture(scope='module')
def single(tmp_path_factory):
  """The one-process run of multihost_config: 8 simulated devices, the same mesh."""
  workdir = str(tmp_path_factory.mktemp('single'))
  train(get_config(), workdir)
  return _rows(workdir)


@pytest.mark.slow  # run by .ci/run as its own step (see pyproject.toml)
def test_two_processes_match_one_process(tmp_path, single):
  multi = str(tmp_path / 'multi')
  port = str(_free_port())
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': '--xla_force_host_platform_device_count=4 '  # 4 devices per process
                      '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'}
  # The documented multi-host command, once per process.
  procs = [subprocess.Popen([sys.executable, '-m', 'moejax.main',
                             f'--config={os.path.join(HERE, "multihost_config.py")}',
                             f'--workdir={multi}', f'--coordinator=localhost:{port}',
                             '--num_processes=2', f'--process_id={i}'],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  _same_losses(_rows(multi), single)
  # Both processes wrote their shards of one checkpoint.
  assert sorted(os.listdir(os.path.join(multi, 'checkpoints'))) == ['2', '4']


def _same_losses(got, want):
  assert sorted(got) == sorted(want) == list(range(5))
  # Tolerance 1e-5 relative: the same program, with the cross-process reductions done by gloo
  # instead of in-process (summation order); a data or sharding bug gives O(1) differences.
  for step in range(1, 5):
    for key in ('train/loss', 'moe/aux_loss', 'moe/max_vio', 'train/grad_norm'):
      np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-5, err_msg=key)
  for step in (2, 4):
    np.testing.assert_allclose(got[step]['eval/loss'], want[step]['eval/loss'], rtol=1e-5)


def _slurm_port():
  """A free port where SLURM's rule puts the coordinator (61440 + job id mod 4096)."""
  for port in range(61440 + os.getpid() % 4000, 65536):
    with socket.socket() as s:
      try:
        s.bind(('localhost', port))
      except OSError:
        continue
      return port
  pytest.skip('no free port in 61440-65535')


@pytest.mark.slow
def test_slurm_launch_with_data_axis_over_processes_and_lock_on_every_host(tmp_path, single):
  """docs/parallelism.md's SLURM command (`srun python -m moejax.main --distributed ...`)
  with the environment srun gives each task: jax.distributed finds the coordinator, the
  process count and ids itself. The data axis spans the two processes (mesh.dcn_data=2,
  jax's hybrid mesh over processes). While another trainer holds the workdir, both processes
  are refused with one line and exit code 2 before compiling; once it is free, the run gives
  the one-process run's losses."""
  from moejax.training.lock import WorkdirLock
  multi = str(tmp_path / 'multi')
  os.makedirs(multi)

  def launch():
    job = _slurm_port() - 61440
    procs = []
    for i in range(2):
      env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
             'XLA_FLAGS': '--xla_force_host_platform_device_count=4 '
                          '--xla_backend_optimization_level=0 '
                          '--xla_llvm_disable_expensive_passes=true',
             'SLURM_JOB_ID': str(job), 'SLURM_STEP_NODELIST': 'localhost', 'SLURM_NTASKS': '2',
             'SLURM_PROCID': str(i), 'SLURM_LOCALID': str(i), 'SLURM_STEP_NUM_NODES': '1'}
      procs.append(subprocess.Popen(
          [sys.executable, '-m', 'moejax.main', '--distributed',
           f'--config={os.path.join(HERE, "multihost_config.py")}', f'--workdir={multi}',
           '--config.mesh.dcn_data=2'],
          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs, [p.communicate(timeout=600) for p in procs]

  held = WorkdirLock(multi).acquire()
  try:
    procs, outs = launch()
  finally:
    held.release()
  assert [p.returncode for p in procs] == [2, 2], [o[1][-2000:] for o in outs]
  last = [o[1].strip().splitlines()[-1] for o in outs]
  assert last[0].startswith(f'error: {multi} is in use by another trainer (host '), last
  assert last[1].startswith(f'error: {multi} is in use by another trainer (host '), last
  assert 'found by process 0' in last[1] and 'Traceback' not in outs[1][1]
  assert not os.path.exists(os.path.join(multi, 'metrics.jsonl'))
  procs, outs = launch()
  assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
  _same_losses(_rows(multi), single)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step(tmp_path):
  """A 30-step two-process run; SIGTERM to process 1 only, after step 3 is logged: JAX's
  preemption service agrees on one step, both processes checkpoint it and exit with code 4
  naming it; the same commands resume, and the losses are one process's (8 devices)."""
  import signal
  import time
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  port = str(_free_port())
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': '--xla_force_host_platform_device_count=4 '
                      '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'}
  longer = ['--config.train.steps=30', '--config.train.log_every=1',
            '--config.train.checkpoint_every=10', '--config.train.eval_every=10']

  def launch():
    return [subprocess.Popen([sys.executable, '-m', 'moejax.main',
                              f'--config={os.path.join(HERE, "multihost_config.py")}',
                              f'--workdir={multi}', f'--coordinator=localhost:{port}',
                              '--num_processes=2', f'--process_id={i}', *longer],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]
  procs = launch()
  deadline = time.monotonic() + 600
  # (metrics.jsonl may exist with no row yet)
  while max(_rows(multi) if os.path.exists(os.path.join(multi, 'metrics.jsonl')) else [],
            default=-1) < 3:
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.01)
  procs[1].send_signal(signal.SIGTERM)
  errs = [p.communicate(timeout=600)[1] for p in procs]
  assert [p.returncode for p in procs] == [4, 4], errs
  steps = {int(e.strip().splitlines()[-1].split('preempted at step ')[1].split(':')[0])
           for e in errs}
  assert len(steps) == 1, errs
  step = steps.pop()
  assert 3 <= step < 30 and str(step) in os.listdir(os.path.join(multi, 'checkpoints'))
  assert max(_rows(multi)) == step
  port = str(_free_port())
  procs = launch()
  outs = [p.communicate(timeout=600) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:]
  c = get_config()
  c.train.steps, c.train.log_every, c.train.checkpoint_every, c.train.eval_every = 30, 1, 10, 10
  train(c, single)
  got, want = _rows(multi), _rows(single)
  assert sorted(got) == sorted(want) == list(range(31))
  for s in range(1, 31):
    np.testing.assert_allclose(got[s]['train/loss'], want[s]['train/loss'], rtol=1e-5)
