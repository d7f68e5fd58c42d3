"""The benchmark command runs and prints one well-formed JSON row per case (tiny shape)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from moejax.bench.command import main
from moejax.bench.moe import ExpertsFloor, forced_routing


def test_experts_floor_is_k_expert_passes_plus_shared():
  """With every expert holding the same weights, the floor's output is K times that SwiGLU of
  each token plus the shared one (8 tokens x K 3 = 24 rows over 5 experts: padded to 25)."""
  x = jax.random.normal(jax.random.key(0), (2, 4, 6))
  floor = ExpertsFloor(num_experts=5, top_k=3, expert_dim=4, shared=1)
  p = nn.unbox(floor.init(jax.random.key(1), x))['params']
  e = {k: jnp.broadcast_to(v[:1], v.shape) for k, v in p['experts'].items()}
  y = floor.apply({'params': {**p, 'experts': e}}, x)
  swiglu = lambda w, x: (jax.nn.silu(x @ w['wi_0']) * (x @ w['wi_1'])) @ w['wo']  # noqa
  want = 3 * swiglu({k: v[0] for k, v in e.items()}, x) + swiglu(p['shared'], x)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_forced_routing_balanced_and_random():
  """Balanced: every expert the same load (T K / N), distinct experts per token; random:
  distinct experts per token, uneven loads, and another seed another draw."""
  b = np.asarray(forced_routing('balanced', 12, 2, 8))
  assert b.shape == (12, 2) and (b[:, 0] != b[:, 1]).all()
  assert np.bincount(b.ravel(), minlength=8).tolist() == [3] * 8
  r = np.asarray(forced_routing('random', 200, 3, 8))
  assert all(len(set(row)) == 3 for row in r) and r.min() >= 0 and r.max() < 8
  counts = np.bincount(r.ravel(), minlength=8)
  assert counts.sum() == 600 and counts.max() > counts.min()
  assert not np.array_equal(r, np.asarray(forced_routing('random', 200, 3, 8, seed=1)))


def test_bench_moe_forced_routing_rows(capsys):
  main(['moe', '--tokens', '128', '--seq', '64', '--d_model', '16', '--experts', '4',
        '--expert_dim', '8', '--top_k', '2', '--reps', '1', '--capacity_factors', '1.0',
        '--group_size', '0', '--routing', 'balanced', '--meshes'])
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert {r['routing'] for r in rows} == {'balanced'}
  # Every expert exactly its share: capacity at factor 1.0 (C = T K / N) drops nothing.
  assert next(r for r in rows if r['case'] == 'capacity_cf1')['dropped_fraction'] == 0.0


def test_bench_moe_smoke(capsys):
  main(['moe', '--tokens', '256', '--seq', '64', '--d_model', '32', '--experts', '8',
        '--expert_dim', '16', '--top_k', '2', '--reps', '1', '--capacity_factors', '0.5',
        '--group_size', '64', '--hf', '--meshes', 'expert=8', 'expert=16'])
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r['case'] for r in rows] == [
      'dense_ffn', 'experts_floor', 'dropless_blocked', 'capacity_cf0.5', 'einsum_g64_cf0.5',
      'hf_torch_dense_ffn', 'hf_deepseek_v3_grouped_mm', 'hf_deepseek_v3_eager', 'all_to_all',
      'all_to_all']
  ours, hf, a2a = [rows[0]] + rows[2:5], rows[5:8], rows[8:]
  assert ours[0]['ratio_to_dense'] == 1.0
  for r in ours:
    assert r['ms'] > 0 and r['temp_bytes'] >= 0 and r['active_gflops_per_s'] > 0
  assert ours[1]['dropped_fraction'] == 0.0
  assert ours[2]['dropped_fraction'] > 0.3  # factor 0.5 cannot hold every choice
  assert ours[3]['dropped_fraction'] > 0.3
  for r in hf[1:]:
    assert r['ms'] > 0 and set(r['moejax_speedup']) == {c['case'] for c in rows[1:5]}
  # 8 experts on 8 ranks, top-2: 2 distinct ranks, 7/8 of them remote, dispatch + combine, bf16.
  assert a2a[0]['a2a_bytes_per_token_per_layer'] == round(2 * 2 * 7 / 8 * 32 * 2)
  assert a2a[0]['tokens_per_device'] == 32 and 'skipped' in a2a[1]


@pytest.mark.slow  # a whole train benchmark: the integration step
def test_bench_train_smoke(capsys):
  """The whole-step benchmark at a tiny shape: one row per case, then the depth sweep."""
  main(['train', '--batch', '4', '--seq', '16', '--d_model', '32', '--heads', '2',
        '--layers', '2', '--experts', '4', '--expert_dim', '8', '--top_k', '2', '--reps', '1',
        '--block_size', '8', '--dispatches', 'dropless', 'capacity', '--depths', '1', '3'])
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r['case'] for r in rows] == ['dense', 'moe_dropless', 'moe_capacity',
                                       'compile_depth', 'compile_depth']
  assert rows[0]['ratio_to_dense'] == 1.0
  for r in rows[:3]:
    assert r['ms'] > 0 and r['tokens_per_sec'] > 0 and r['compile_s'] > 0 and r['temp_bytes'] > 0
    assert r['tokens_per_step'] == 64
  assert [r['layers'] for r in rows[3:]] == [1, 3]


@pytest.mark.slow  # the data benchmark reads and tokenizes a corpus
def test_bench_data_smoke(capsys, tmp_path):
  from moejax.prepare import prepare
  (tmp_path / 'text').mkdir()
  for i in range(8):
    (tmp_path / 'text' / f'{i}.txt').write_text(f'line {i} of some text\n' * 200)
  prepare(str(tmp_path / 'text'), str(tmp_path / 'p'), '*.txt', fmt='bin', val_percent=20,
          progress=False, log=lambda *_: None)
  (tmp_path / 'cfg.py').write_text(
      'from moejax.config import base_config\n'
      'def get_config():\n'
      '  c = base_config()\n'
      '  m = c.model\n'
      '  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim = 32, 2, 2, 1, 16\n'
      '  m.ffn_dim, m.moe.num_experts, m.moe.expert_ffn_dim = 64, 4, 16\n'
      '  c.data.seq_len, c.train.batch_size = 16, 4\n'
      '  return c\n')
  main(['data', '--config', str(tmp_path / 'cfg.py'), '--prepared_dir', str(tmp_path / 'p'),
        '--batches', '20', '--reps', '2'])
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r['case'] for r in rows] == ['loader_bin', 'loader_memory', 'train_step']
  for r in rows[:2]:
    assert r['tokens_per_s'] > 0 and r['times_train_step'] == r['tokens_per_s'] / rows[2][
        'tokens_per_s']
    assert abs(r['tokens_per_s'] - r['batches_per_s'] * 4 * 16) <= 1e-9 * r['tokens_per_s']


@pytest.mark.slow
def test_bench_accelerator_runs_on_cpu_at_small_shapes(tmp_path, capsys):
  """The accelerator check end to end on the CPU (8 simulated devices: expert parallelism
  included): every numerics row within tolerance, the layer rows at 8, 64 and 256 experts for
  each backend, the train step with its TFLOP/s, and the two files."""
  assert main(['accelerator', '--out', str(tmp_path), '--no_tests', '--json']) == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  numerics = [r for r in rows if r['check'] == 'numerics']
  assert numerics and all(r['ok'] for r in numerics), [r for r in numerics if not r['ok']]
  assert {r['dispatch'] for r in numerics} >= {'capacity', 'einsum', 'dropless', 'all_to_all',
                                               'ring'}
  assert {r['block'] for r in numerics} == {'swiglu', 'mlp'}
  layer = [r for r in rows if r['check'] == 'moe_layer']
  assert {r['experts'] for r in layer} == {8, 64, 256}
  assert {r['routing'] for r in layer} == {'learned', 'balanced'}
  assert {'dense_ffn', 'dropless_blocked', 'dropless_ragged_dot'} <= {r['case'] for r in layer}
  train = [r for r in rows if r['check'] == 'train_step']
  assert [r['case'] for r in train] == ['dense', 'moe_dropless']
  assert all(r['tflops_per_device'] > 0 and r['mfu'] is None for r in train)  # CPU: no peak
  saved = json.load(open(tmp_path / 'accelerator.json'))
  assert saved['header']['small_shapes'] and len(saved['rows']) == len(rows)
  md = (tmp_path / 'accelerator.md').read_text()
  assert '## Numerics' in md and '## Train step' in md and '| 256 |' in md
