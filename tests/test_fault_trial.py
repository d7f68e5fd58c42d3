"""Fault trial: 20 kill -9s at random moments, a third of them as soon as a checkpoint is being
written, against an uninterrupted run of the same command. Every restart must work (exit 0 or
killed, no traceback), resume from the newest checkpoint finished before the kill, and the
final metrics must hold each step once with the uninterrupted run's losses, bit for bit."""
import json
import os
import random
import subprocess
import sys
import time

import pytest

from moejax.training.metrics import read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
KILLS = 20


def _env(cache):
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_COMPILATION_CACHE_DIR': cache,
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
          'XLA_FLAGS': '--xla_backend_optimization_level=0 '
                       '--xla_llvm_disable_expensive_passes=true'}


def _command(workdir):
  return [sys.executable, '-m', 'moejax.main', f'--config={HERE}/fault_config.py',
          f'--workdir={workdir}']


def _finished_checkpoints(workdir):
  d = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _last_step(workdir) -> int:
  try:
    with open(os.path.join(workdir, 'metrics.jsonl'), 'rb') as f:
      lines = f.read().splitlines()
    return max([json.loads(l)['step'] for l in lines[-3:] if l.endswith(b'}')] or [-1])
  except (OSError, ValueError):
    return -1


def _writing(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(d) and any('tmp' in n for n in os.listdir(d))


def _reference(tmp_path):
  """(env, the uninterrupted run's workdir, its seconds): the run every trial compares with."""
  env = _env(str(tmp_path / 'jit_cache'))
  reference = str(tmp_path / 'reference')
  t0 = time.monotonic()
  subprocess.run(_command(reference), env=env, check=True, capture_output=True)
  return env, reference, time.monotonic() - t0


@pytest.mark.slow  # ~2-3 minutes: the integration step of .ci/run
def test_random_kills_change_nothing(tmp_path):
  env, reference, duration = _reference(tmp_path)

  workdir = str(tmp_path / 'trial')
  rng = random.Random(0)
  kills, during_write, lives = 0, 0, 0
  expected_resume = None
  while True:
    lives += 1
    assert lives < 3 * KILLS, 'the trial does not finish'
    proc = subprocess.Popen(_command(workdir), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    killed = False
    if kills < KILLS:
      # Three kinds of kill, in turn: as soon as a checkpoint write starts; after 1-4 new
      # steps; at a random moment (start-up, compile, restore or training).
      kind = ('write', 'steps', 'time')[kills % 3]
      # Rows past the checkpoint are only removed once the life has restored it: count new
      # steps from the highest logged so far.
      base = max(expected_resume or 0, _last_step(workdir))
      target_step = base + rng.randint(1, 4)
      deadline = time.monotonic() + rng.uniform(0.2, 0.4) * duration
      while proc.poll() is None:
        last = _last_step(workdir)
        if ((kind == 'write' and _writing(workdir)) or
            (kind == 'steps' and last >= target_step) or
            time.monotonic() >= deadline or  # every kind: a random moment at the latest,
            last >= base + 6):  # and after 6 new steps, so 20 kills fit in the run
          during_write += _writing(workdir)
          proc.kill()
          killed = True
          break
        time.sleep(0.002)
    out, err = proc.communicate(timeout=600)
    assert 'Traceback' not in err and 'corrupt' not in err, err[-3000:]
    # A life that got as far as restoring resumed from the newest finished checkpoint (one
    # killed earlier, in start-up, says nothing; the last life must say it).
    if expected_resume is not None and ('resuming' in err or proc.returncode == 0):
      assert f'resuming from checkpoint step {expected_resume}\n' in err, (expected_resume,
                                                                           err[-2000:])
    if killed and proc.returncode == -9:
      kills += 1
      done = _finished_checkpoints(workdir)
      expected_resume = done[-1] if done else None
      continue
    assert proc.returncode == 0, err[-3000:]
    break

  assert kills == KILLS and during_write >= KILLS // 4, (kills, during_write)
  assert_same_run(workdir, reference)
  assert _finished_checkpoints(workdir) == _finished_checkpoints(reference)


def assert_same_run(workdir, reference):
  """The trial's metrics hold each step once, with the uninterrupted run's values bit for bit."""
  got = read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  want = read_metrics(os.path.join(reference, 'metrics.jsonl'))
  assert [r['step'] for r in got] == list(range(201))  # each step exactly once
  for a, b in zip(got, want):
    for key in ('train/loss', 'train/grad_norm', 'moe/max_vio', 'eval/loss'):
      assert a.get(key) == b.get(key), (a['step'], key)
