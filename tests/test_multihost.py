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


@pytest.mark.slow  # run by .ci/run as its own step (see pyproject.toml)
def test_two_processes_match_one_process(tmp_path):
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
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
  train(get_config(), single)  # this process: 8 simulated devices, same mesh (data=2, expert=4)
  got, want = _rows(multi), _rows(single)
  assert sorted(got) == sorted(want) == list(range(5))
  # Tolerance 1e-5 relative: the same program, with the cross-process reductions done by gloo
  # instead of in-process (summation order); a data or sharding bug gives O(1) differences.
  for step in range(1, 5):
    for key in ('train/loss', 'moe/aux_loss', 'moe/max_vio', 'train/grad_norm'):
      np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-5, err_msg=key)
  for step in (2, 4):
    np.testing.assert_allclose(got[step]['eval/loss'], want[step]['eval/loss'], rtol=1e-5)
  # Both processes wrote their shards of one checkpoint.
  assert sorted(os.listdir(os.path.join(multi, 'checkpoints'))) == ['2', '4']
