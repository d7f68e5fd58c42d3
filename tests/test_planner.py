"""The memory and device planner (moejax/costs/planner.py), against hand counts."""
import json
import math
import pathlib
import subprocess
import sys

import pytest

from conftest import tiny_config
from moejax.config import ConfigError
from moejax.costs.parameters import count_params
from moejax.costs.planner import (all_to_all, expected_devices_reached, kv_cache_numbers_per_token,
                            parse_mesh, plan, weight_elements_per_device)


def test_weights_per_device_follow_the_sharding_rules():
  m = tiny_config().model
  counts = count_params(m)
  one = parse_mesh('')
  assert weight_elements_per_device(m, one) == (counts['total'], counts['total'])
  # expert=4 splits the routed experts' expert dimension (8 experts -> 2 per device) and the
  # model dimension (32 -> 8) of every other weight that has one (embed), not the norms'.
  per_device, _ = weight_elements_per_device(m, parse_mesh('expert=4'))
  norms = counts['norms']
  assert per_device == (counts['routed_experts'] // 4 + (counts['total'] - counts['routed_experts']
                                                           - norms) // 4 + norms)
  # fsdp=2 with expert=4: the experts' model dimension over fsdp only (the expert axis is
  # theirs already), the others' over both.
  per_device, _ = weight_elements_per_device(m, parse_mesh('fsdp=2,expert=4'))
  assert per_device == (counts['routed_experts'] // 8 + (counts['total'] - counts['routed_experts']
                                                           - norms) // 8 + norms)


def test_kv_cache_per_token_matches_the_formulas():
  m = tiny_config().model  # GQA: 2 (k and v) * kv_heads * head_dim per layer
  assert kv_cache_numbers_per_token(m) == m.num_layers * 2 * m.num_kv_heads * m.head_dim
  m.attention = 'mla'  # MLA: the latent and the shared rotary key
  assert kv_cache_numbers_per_token(m) == m.num_layers * (m.mla.kv_lora_rank +
                                                          m.mla.qk_rope_head_dim)


def test_expected_ranks_reached_hand_case():
  # 4 experts on 2 ranks, top-2: both experts on one rank with probability 2 / C(4,2) = 1/3.
  assert expected_devices_reached(4, 2, 2) == pytest.approx(2 * (1 - 1 / 6))
  assert expected_devices_reached(4, 2, 2) == pytest.approx(1 * 1 / 3 + 2 * 2 / 3)
  assert expected_devices_reached(8, 2, 1) == 1.0
  assert expected_devices_reached(256, 8, 8, limit=4) == 4  # group-limited routing caps it


def test_all_to_all_bytes_hand_case():
  m = tiny_config().model  # 8 experts, top-2, d 32, two MoE layers
  out = all_to_all(m, parse_mesh('expert=2'), tokens_per_device=100, dtype='bf16')
  reached = 2 * (1 - math.comb(4, 2) / math.comb(8, 2))
  per_token = 2 * reached * (1 / 2) * 32 * 2  # dispatch + combine, remote share, bf16
  assert out['a2a_bytes_per_token_per_layer'] == round(per_token)
  assert out['a2a_bytes_per_device_per_layer'] == round(per_token * 100)
  assert out['moe_layers'] == 2
  assert all_to_all(m, parse_mesh('data=8'), 100, 'bf16')['a2a_bytes_per_token_per_layer'] == 0


def test_plan_device_counts_and_errors():
  m = tiny_config().model
  counts = count_params(m)
  out = plan(m, parse_mesh('data=2,expert=4'), device_memory_gib=1e-4, context=64,
             decode_batch=4, tokens_per_device=16)
  budget = 1e-4 * 2**30 * 0.9
  kv = kv_cache_numbers_per_token(m) * 64 * 4 * 2
  assert out['bf16']['min_devices_inference'] == math.ceil((counts['total'] * 2 + kv) / budget)
  assert out['bf16']['min_devices_training'] == math.ceil(counts['total'] * 16 / budget)
  assert out['fp8']['min_devices_inference'] < out['bf16']['min_devices_inference']
  with pytest.raises(ConfigError, match='--mesh'):
    parse_mesh('experts=4')
  with pytest.raises(ConfigError, match='must divide model.moe.num_experts'):
    plan(m, parse_mesh('expert=3'), 80, 64, 1, 16)


def test_cli_deepseek_v3():
  out = subprocess.run([sys.executable, '-m', 'moejax.params', '--config=configs/deepseek_v3.py',
                        '--mesh=expert=64,tensor=8', '--device_memory=80', '--json'],
                       capture_output=True, text=True, check=True,
                       cwd=str(pathlib.Path(__file__).resolve().parents[1]))
  counts, planned = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
  assert planned['kv_numbers_per_token_per_layer'] == 576  # the DeepSeek-V3 figure
  assert planned['devices'] == 512 and planned['bf16']['inference_fits']
  # Ideal sharding bound: 671B bf16 weights need at least 671e9 * 2 / (0.9 * 80 GiB) devices.
  assert planned['bf16']['min_devices_inference'] >= math.ceil(counts['total'] * 2 /
                                                               (0.9 * 80 * 2**30))
  # The published shape is planned at a pretraining context, not the base config's 128.
  assert counts['seq_len'] == 4096
  # Without --json: the same numbers as tables.
  from moejax.params import tables
  text = tables(counts, planned)
  row = next(line for line in text.splitlines() if 'devices needed, training' in line)
  assert row.split()[-2:] == [str(planned['bf16']['min_devices_training']),
                              str(planned['fp8']['min_devices_training'])]
  assert f"{counts['total'] / 1e9:,.3f}B" in text and 'multi-token prediction' in text
