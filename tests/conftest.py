"""Test session setup: 8 simulated CPU devices (set before jax is imported) and shared configs."""
import os

# 8 simulated devices. The test shapes are tiny, so compilation dominates the run time: the
# cheapest LLVM optimisation level halves it (results are unchanged up to float rounding).
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0'
                           ' --xla_llvm_disable_expensive_passes=true').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Training runs in the tests compile the same programs again (resume, refusal checks): a
# session-wide persistent cache turns those recompiles into loads. Each test process makes its
# own and removes it when it exits.
_CACHE = tempfile.mkdtemp(prefix='moejax-jit-cache-')
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

from moejax.config import base_config  # noqa: E402


def tiny_config(**moe):
  """A 3-layer model (dense, MoE, MoE) small enough to compile in seconds."""
  c = base_config()
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim = 32, 3, 4, 2, 8
  m.ffn_dim, m.first_k_dense = 64, 1
  m.moe.num_experts, m.moe.num_experts_per_tok, m.moe.expert_ffn_dim = 8, 2, 16
  for k, v in moe.items():
    m.moe[k] = v
  c.data.seq_len, c.data.max_bytes = 16, 200_000
  c.train.batch_size, c.train.steps, c.train.warmup_steps = 8, 6, 2
  c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 1, 3, 3
  c.train.eval_batches, c.train.progress = 2, False
  return c


def expert_block_config(block: str, dispatch: str = 'dropless', backend: str = 'auto',
                        **experts):
  """tiny_config() with the expert block `block` (its settings `experts`) on a dispatch path
  where nothing drops, and no shared expert: for checks of a block on every path."""
  c = tiny_config()
  moe = c.model.moe
  moe.experts.name, moe.experts.backend = block, backend
  for k, v in experts.items():
    moe.experts[k] = v
  moe.dispatch.name, moe.num_shared_experts = dispatch, 0
  if dispatch in ('capacity', 'einsum', 'all_to_all'):
    moe.dispatch.capacity_factor = 100.0  # nothing drops
  if dispatch == 'einsum':
    moe.dispatch.group_size = 16
  return c


def trainer_on(c, sizes: dict):
  """A Trainer for config c on a mesh of these axis sizes, over the first devices."""
  import numpy as np
  from moejax.checks import validate
  from moejax.parallel.mesh import mesh_shape
  from moejax.parallel.mesh import make_mesh
  from moejax.training.step import Trainer
  n = int(np.prod(list(sizes.values())))
  for axis, size in sizes.items():
    c.mesh[axis] = size
  validate(c, n)
  return Trainer(c, make_mesh(mesh_shape(c.mesh, n), jax.devices()[:n]))


def train_side_by_side(one, other, keys, steps: int = 2, rtol=1e-5, atol=1e-6):
  """Train two Trainers (e.g. 1 device and 8) from the same initial state on the same random
  batches and compare the metrics `keys` after every step; returns the two final states and
  the last metrics (m_one, m_other)."""
  import numpy as np
  state1 = one.init(0)
  state2 = jax.device_put(jax.device_get(state1), other.state_sharding)  # a copy: steps donate
  rng = np.random.default_rng(0)
  for _ in range(steps):
    tokens = rng.integers(0, 256, (8, 17)).astype(np.int32)
    batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}
    state1, m1 = one.train_step(state1, batch)
    state2, m2 = other.train_step(state2, batch)
    m1, m2 = jax.device_get((m1, m2))
    for k in keys:
      np.testing.assert_allclose(m2[k], m1[k], rtol=rtol, atol=atol, err_msg=k)
  return state1, state2, m1, m2


def build_router(cls, section, num_experts: int, k: int, vocab_size: int = 258):
  """A router class built as the registry builds it: its settings from a model.moe.router
  section (a ConfigDict or FrozenConfigDict)."""
  return cls(num_experts=num_experts, k=k, vocab_size=vocab_size,
             **{f: section[f] for f in cls.settings()})


@pytest.fixture
def config():
  return tiny_config()


# --- The slow step: each test in a fresh interpreter ------------------------------------------
# jaxlib 0.10.2 can crash a long-lived process that has compiled and freed many programs (a
# segmentation fault in libgcc's unwinder: docs/testing.md, "A crash inside jaxlib"), and the
# slow step's workers compile the most. So there every test runs in a child pytest of its own
# (MOEJAX_TEST_CHILD set), and its outcome is reported here as if it had run in this process.
_CHILD_ENV = 'MOEJAX_TEST_CHILD'


def _isolated(item) -> bool:
  return item.get_closest_marker('slow') is not None and not os.environ.get(_CHILD_ENV)


def _child_outcome(item):
  """Run `item` alone in a new interpreter: (outcome, longrepr, seconds)."""
  import subprocess
  import sys
  import time
  import xml.etree.ElementTree as ET
  with tempfile.TemporaryDirectory(prefix='moejax-child-') as tmp:
    report = os.path.join(tmp, 'report.xml')
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, '-m', 'pytest', item.nodeid, '-m', 'slow', '-q', '-p', 'no:cacheprovider',
         '-p', 'no:xdist', f'--junitxml={report}', '--durations=0'],
        cwd=str(item.config.rootpath), env={**os.environ, _CHILD_ENV: '1'},
        capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = (done.stdout + done.stderr)[-20000:]
    cases = ET.parse(report).getroot().iter('testcase') if os.path.exists(report) else []
    case = next(iter(cases), None)
  if case is None:
    return 'failed', f'the child pytest ran no test (exit {done.returncode}):\n{output}', seconds
  skipped = case.find('skipped')
  if skipped is not None and done.returncode == 0:
    return 'skipped', (str(item.path), item.location[1] or 0,
                       skipped.get('message', 'skipped')), seconds
  if done.returncode == 0:
    return 'passed', None, seconds
  return 'failed', f'in its own interpreter (exit {done.returncode}):\n{output}', seconds


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
  if not _isolated(item):
    return None
  from _pytest.reports import TestReport
  hook = item.ihook
  hook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
  outcome, longrepr, seconds = _child_outcome(item)
  keywords = {k: 1 for k in item.keywords}

  def report(when, result, text=None, duration=0.0):
    hook.pytest_runtest_logreport(report=TestReport(
        item.nodeid, item.location, keywords, result, text, when, [], duration, 0.0, 0.0,
        user_properties=[]))
  if outcome == 'skipped':
    report('setup', 'skipped', longrepr)
  else:
    report('setup', 'passed')
    report('call', outcome, longrepr, seconds)
  report('teardown', 'passed')
  hook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
  return True
