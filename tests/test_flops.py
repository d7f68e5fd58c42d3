"""FLOPs per token (moejax/costs/flops.py) against a hand count of the tiny model."""
import pytest

from moejax.costs.flops import flops_per_token, train_flops

from conftest import tiny_config


def test_tiny_model_by_hand():
  # d 32, 3 layers (dense, MoE, MoE), 4 heads of 8 (2 kv heads), dense FFN 64, 8 experts of
  # width 16 top-2, one shared expert of 16, vocabulary 258, untied head, seq 16.
  attention = 3 * (32 * 4 * 8 + 2 * 32 * 2 * 8 + 4 * 8 * 32)  # wq, wk, wv, wo
  dense = 3 * 32 * 64
  moe = 2 * (32 * 8 + 3 * 32 * 16 + 2 / 8 * 8 * 3 * 32 * 16)  # router, shared, 2 of 8 experts
  head = 32 * 258
  weights = attention + dense + moe + head
  scores = 3 * 2 * 16 * 4 * (8 + 8)  # layers x 2 x ctx x heads x (d_qk + d_v)
  f = flops_per_token(tiny_config().model, 16)
  assert f['matmul_weights'] == weights == 33344
  assert f['routed_weights'] == 2 * 2 * 3 * 32 * 16
  assert f['attention'] == scores
  assert f['forward'] == 2 * weights + scores and f['train'] == 3 * f['forward']
  c = tiny_config()
  assert train_flops(c) == f['train'] * 6 * 8 * 16  # steps x batch x seq_len


@pytest.mark.parametrize('router,fields,experts', [
    ('expert_choice', {'ec_capacity_factor': 3.0}, 3.0),
    ('expert_threshold', {'threshold_target': 1.5}, 1.5),
    ('topk', {'null_experts': 8}, 1.0),  # K = 2 over 8 real + 8 null experts
])
def test_the_routed_experts_count_as_the_router_uses_them(router, fields, experts):
  m = tiny_config().model
  m.moe.router.name = router
  if router == 'expert_threshold':
    m.moe.num_experts_per_tok = 4
  for k, v in fields.items():
    m.moe.router[k] = v
  f = flops_per_token(m, 16)
  assert f['expected_experts'] == experts
  assert f['routed_weights'] == 2 * experts * 3 * 32 * 16


def test_tied_embeddings_count_as_the_head_and_mla_by_its_dims():
  m = tiny_config().model
  base = flops_per_token(m, 16)['matmul_weights']
  m.tie_embeddings = True
  assert flops_per_token(m, 16)['matmul_weights'] == base  # the table is the head
  m = tiny_config().model
  m.attention = 'mla'
  m.mla.qk_nope_head_dim, m.mla.qk_rope_head_dim, m.mla.v_head_dim = 8, 4, 6
  assert flops_per_token(m, 16)['attention'] == 3 * 2 * 16 * 4 * (8 + 4 + 6)


def test_windows_chunks_and_nope_layers_count_their_own_context():
  """Per layer: a windowed layer over min(seq, window) positions, a chunked one over its chunk,
  a NoPE layer over the whole sequence; 4 layers, seq 16."""
  per = lambda ctx: 2 * ctx * 4 * (8 + 8)
  m = tiny_config().model
  m.num_layers, m.sliding_window, m.sliding_pattern = 4, 5, (1, 0)
  assert flops_per_token(m, 16)['attention'] == 2 * per(5) + 2 * per(16)
  m.sliding_window, m.attention_chunk, m.nope_every = 0, 6, 4  # layer 3 is NoPE
  assert flops_per_token(m, 16)['attention'] == 3 * per(6) + per(16)
  m.sliding_window, m.sliding_pattern = 4, (1,)  # window inside the chunk wins where smaller
  assert flops_per_token(m, 16)['attention'] == 3 * per(4) + per(4)


def test_multi_token_prediction_counts_its_blocks_and_the_shared_head_again():
  """model.mtp.depth = 2: each depth adds its projection [2d, d], one more MoE block and the
  output head once more (shared, so one table in the parameters), and attends like layer
  num_layers + k - 1: a window pattern reaches the MTP blocks."""
  per = lambda ctx: 2 * ctx * 4 * (8 + 8)
  m = tiny_config().model
  base = flops_per_token(m, 16)
  m.mtp.depth = 2
  f = flops_per_token(m, 16)
  attn = 32 * 4 * 8 + 2 * 32 * 2 * 8 + 4 * 8 * 32  # wq, wk, wv, wo
  block = attn + 32 * 8 + 3 * 32 * 16 + 2 / 8 * 8 * 3 * 32 * 16  # router, shared, 2 of 8
  assert f['matmul_weights'] == base['matmul_weights'] + 2 * (2 * 32 * 32 + block + 32 * 258)
  assert f['routed_weights'] == base['routed_weights'] + 2 * 2 * 3 * 32 * 16
  assert f['attention'] == 5 * per(16)
  m.sliding_window, m.sliding_pattern = 5, (1, 0)  # layers 0, 2 and MTP depth 2 (layer 4)
  assert flops_per_token(m, 16)['attention'] == 3 * per(5) + 2 * per(16)
  m.sliding_window, m.tie_embeddings = 0, True  # the table is the head, run 1 + depth times
  assert flops_per_token(m, 16)['matmul_weights'] == f['matmul_weights']


def test_biases_and_sinks_are_not_matmul_weights():
  """Biases on the attention projections, the router, the experts and the head, and the
  sinks, are additions: the matmul weights stay those of the unbiased model."""
  m = tiny_config().model
  base = flops_per_token(m, 16)['matmul_weights']
  m.qkv_bias = m.attention_out_bias = m.attention_sinks = m.head_bias = True
  m.moe.router.logit_bias = True
  m.moe.experts.name, m.moe.experts.bias = 'glu', True
  assert flops_per_token(m, 16)['matmul_weights'] == base


@pytest.mark.parametrize('kind,peak', [
    ('TPU v4', 275.0), ('TPU v5 lite', 197.0), ('TPU v5p', 459.0), ('TPU v6 lite', 918.0),
    ('NVIDIA A100-SXM4-80GB', 312.0), ('NVIDIA H100 80GB HBM3', 989.0), ('NVIDIA H200', 989.0),
    ('NVIDIA B200', 2250.0), ('cpu', 0.0)])
def test_peak_by_device_kind(kind, peak):
  from moejax.costs.flops import peak_tflops
  assert peak_tflops(kind) == peak
  assert peak_tflops(kind, 123.0) == 123.0  # train.peak_tflops overrides the table


def test_throughput_is_flops_times_tokens_over_devices_and_peak():
  import jax
  from moejax.training.loop import Throughput
  c = tiny_config()
  c.train.peak_tflops = 2.0
  perf = Throughput(c)
  per_token = flops_per_token(c.model, 16)['train']
  out = perf.of(1e6)
  assert out['perf/tflops_per_device'] == pytest.approx(per_token * 1e6 / jax.device_count() / 1e12)
  assert out['perf/mfu'] == pytest.approx(out['perf/tflops_per_device'] / 2.0)
  c.train.peak_tflops = 0.0
  assert 'perf/mfu' not in Throughput(c).of(1e6)  # CPU: no peak, no MFU
