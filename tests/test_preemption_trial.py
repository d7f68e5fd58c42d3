"""Preemption trial: SIGTERM (the notice TPU spot VMs, queued resources and SLURM send before they
take the machines back) at random moments of the fault trial's 200-step run: after a few new
steps, as a checkpoint write starts, as an evaluation step begins, at a random time (start-up,
compile, restore or training). Each life that was training finishes the step in flight, logs
it, checkpoints it and exits with code 4 and the line naming that step, which is at least the
last step logged before the signal (no finished step is lost); the next life resumes there.
The final metrics hold each step once with the uninterrupted run's losses, bit for bit."""
import random
import signal
import subprocess
import time

import pytest

from test_fault_trial import (_command, _finished_checkpoints, _last_step, _reference, _writing,
                              assert_same_run)

SIGNALS = 8


@pytest.mark.slow  # ~2-3 minutes: the integration step of .ci/run
def test_sigterm_at_random_moments_loses_no_step(tmp_path):
  env, reference, duration = _reference(tmp_path)

  workdir = str(tmp_path / 'trial')
  rng = random.Random(1)
  sent, preempted, lives, kinds = 0, [], 0, []
  while True:
    lives += 1
    assert lives < 4 * SIGNALS, 'the trial does not finish'
    proc = subprocess.Popen(_command(workdir), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    signalled, logged = False, -1
    if sent < SIGNALS:
      kind = ('steps', 'write', 'eval', 'time')[sent % 4]
      base = _last_step(workdir)
      target = base + rng.randint(1, 4)
      deadline = time.monotonic() + rng.uniform(0.1, 0.4) * duration
      while proc.poll() is None:
        last = _last_step(workdir)
        if ((kind == 'steps' and last >= target) or (kind == 'write' and _writing(workdir)) or
            (kind == 'eval' and last > base and last % 30 == 29) or
            time.monotonic() >= deadline or last >= base + 8):
          logged = _last_step(workdir)
          proc.send_signal(signal.SIGTERM)
          signalled = True
          kinds.append(kind)
          break
        time.sleep(0.002)
    out, err = proc.communicate(timeout=600)
    assert 'Traceback' not in err and 'corrupt' not in err, err[-3000:]
    if signalled:
      sent += 1
      if proc.returncode == 4:
        line = err.strip().splitlines()[-1]
        step = int(line.split('preempted at step ')[1].split(':')[0])
        assert line.endswith('resume with the same command'), line
        assert step >= logged and step in _finished_checkpoints(workdir), (step, logged)
        assert _last_step(workdir) == step  # its metrics row is written
        preempted.append(step)
        continue
      if proc.returncode == -signal.SIGTERM:  # before training began: nothing to lose
        assert logged <= max(0, base), (logged, base)
        continue
      assert proc.returncode == 0, err[-3000:]  # the signal came after the last step
    else:
      assert proc.returncode == 0, err[-3000:]
    break

  print(f'\nSIGTERMs: {sent} ({", ".join(kinds)}); preempted and checkpointed at steps '
        f'{preempted}; {lives} lives')
  assert sent == SIGNALS and len(preempted) >= SIGNALS // 2, (sent, preempted, kinds)
  assert_same_run(workdir, reference)
