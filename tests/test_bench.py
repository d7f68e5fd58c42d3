"""The benchmark command runs and prints one well-formed JSON row per case (tiny shape)."""
import json

from moejax.bench import main


def test_bench_moe_smoke(capsys):
  main(['moe', '--tokens', '256', '--seq', '64', '--d-model', '32', '--experts', '8',
        '--expert-dim', '16', '--top-k', '2', '--reps', '1', '--capacity-factors', '0.5'])
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r['case'] for r in rows] == ['dense_ffn', 'dropless_blocked', 'capacity_cf0.5']
  assert rows[0]['ratio_to_dense'] == 1.0
  for r in rows:
    assert r['ms'] > 0 and r['temp_bytes'] >= 0 and r['active_gflops_per_s'] > 0
  assert rows[1]['dropped_fraction'] == 0.0
  assert rows[2]['dropped_fraction'] > 0.3  # factor 0.5 cannot hold every choice
