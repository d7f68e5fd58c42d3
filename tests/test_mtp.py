"""Multi-token prediction (DeepSeek-V3): loss against a hand computation, alignment of each
depth's targets, and modules skipped at inference."""
import jax
import ml_collections
import numpy as np
import pytest

from moejax.model.transformer import Transformer
from moejax.training.step import mtp_total

from conftest import tiny_config


@pytest.fixture(scope='module')
def case():
  c = tiny_config()
  c.model.mtp.depth, c.model.mtp.loss_weight = 2, 0.3
  model = Transformer(ml_collections.FrozenConfigDict(c.model), train=True)
  tokens = jax.random.randint(jax.random.key(0), (2, 11), 0, 256)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  v = jax.jit(model.init)(jax.random.key(1), inputs)
  (logits, aux), _ = jax.jit(lambda v, x: model.apply(v, x, mutable=['moe_state']))(v, inputs)
  return c, v, inputs, targets, logits, aux


def test_mtp_loss_by_hand(case):
  c, _, _, targets, _, aux = case
  depth_logits = aux['mtp_logits']
  assert [lg.shape[1] for lg in depth_logits] == [9, 8]  # depth k predicts 10 - k positions
  # Depth k at position i predicts token i + k + 1 of the sequence, which is targets[i + k].
  ces = []
  for k, lg in enumerate(depth_logits, start=1):
    lg = np.asarray(lg, np.float64)
    total, n = 0.0, 0
    for b in range(lg.shape[0]):
      for i in range(lg.shape[1]):
        row = lg[b, i]
        logz = np.log(np.sum(np.exp(row - row.max()))) + row.max()
        total += logz - row[int(targets[b, i + k])]
        n += 1
    ces.append(total / n)
  metrics = {}
  loss = mtp_total(aux, targets, c.model.mtp, metrics)
  expected = 0.3 / 2 * (ces[0] + ces[1]) + float(aux['mtp_moe_loss'])
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert float(metrics['train/mtp_ce_1']) == pytest.approx(ces[0], rel=1e-5)
  assert float(metrics['train/mtp_ce_2']) == pytest.approx(ces[1], rel=1e-5)


def test_mtp_skipped_at_inference(case):
  c, v, inputs, _, train_logits, _ = case
  eval_model = Transformer(ml_collections.FrozenConfigDict(c.model), train=False)
  logits, aux = jax.jit(eval_model.apply)(v, inputs)
  assert 'mtp_logits' not in aux
  np.testing.assert_allclose(logits, train_logits, rtol=1e-5, atol=1e-5)  # same main model
  assert any(k.startswith('mtp_1_') for k in v['params'])
