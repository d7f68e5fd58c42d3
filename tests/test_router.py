"""TopKRouter and the balance losses against hand-worked numbers.

Router weights are the identity, so the logits are the inputs:
  token 0: logits [2, 1, 0, -1]  -> p = [0.643914, 0.236883, 0.087144, 0.032059]
  token 1: logits [0, 1, .5, 3]  -> p = [0.039289, 0.106798, 0.064776, 0.789137]
Top-2: token 0 -> experts (0, 1); token 1 -> experts (3, 1).
Renormalised weights: softmax of the two kept logits = sigmoid(logit gap):
  token 0: sigmoid(1) = 0.731059, 0.268941;  token 1: sigmoid(2) = 0.880797, 0.119203.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import base_config
from moejax.moe import balance, losses
from moejax.moe.routers.topk import TopKRouter
from moejax.moe.types import RouterOutput

X = jnp.array([[2., 1., 0., -1.], [0., 1., .5, 3.]])
P = np.array([[0.643914, 0.236883, 0.087144, 0.032059],
              [0.039289, 0.106798, 0.064776, 0.789137]])

from conftest import build_router


def make_router(k=2, **router):
  moe = base_config().model.moe
  for key, v in router.items():
    moe.router[key] = v
  return build_router(TopKRouter, moe.router, 4, k)


def route(norm):
  return make_router(norm_topk_prob=norm).apply({'params': {'w': jnp.eye(4)}}, X)


@pytest.mark.parametrize('norm,weights', [
    (False, [[0.643914, 0.236883], [0.789137, 0.106798]]),  # DeepSeek-V1/V2: raw softmax
    (True, [[0.731059, 0.268941], [0.880797, 0.119203]]),  # Mixtral: renormalised
])
def test_topk_router_hand_worked(norm, weights):
  r = route(norm)
  np.testing.assert_array_equal(r.expert_index, [[0, 1], [3, 1]])
  np.testing.assert_allclose(r.combine_weights, weights, atol=1e-6)
  np.testing.assert_allclose(r.probs, P, atol=1e-6)
  assert r.probs.dtype == jnp.float32


def test_renormalised_equals_softmax_over_selected_logits():
  """The Mixtral form (top-K of logits, then softmax over those K) gives the same weights."""
  r = route(True)
  kept = jnp.take_along_axis(r.logits, r.expert_index, axis=1)
  np.testing.assert_allclose(r.combine_weights, jax_softmax(kept), atol=1e-6)


def jax_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_router_runs_in_float32_for_bf16_inputs():
  router = make_router()
  r = router.apply({'params': {'w': jnp.eye(4)}}, X.astype(jnp.bfloat16))
  assert r.logits.dtype == jnp.float32 and r.combine_weights.dtype == jnp.float32


def test_switch_aux_loss_hand_worked():
  # counts (1, 2, 0, 1) over K*T = 4 -> f = (.25, .5, 0, .25); P = column means of p.
  # 4 * (.25 * .341602 + .5 * .171840 + 0 + .25 * .410598) = 1.095880
  r = route(False)
  assert float(losses.switch_aux_loss(r, 4)) == pytest.approx(1.095880, abs=1e-5)


def test_z_loss_hand_worked():
  # logsumexp = (2.440190, 3.236816); mean of squares = 8.215750
  assert float(losses.router_z_loss(route(False))) == pytest.approx(8.215750, abs=1e-5)


def test_load_stats_hand_worked():
  s = balance.load_stats(losses.expert_counts(route(False).expert_index, 4), route(False).probs)
  np.testing.assert_allclose(s['expert_load'], [.25, .5, 0, .25])
  assert float(s['max_vio']) == pytest.approx(1.0)  # (max 2 - mean 1) / mean 1


@pytest.mark.parametrize('n,k', [(4, 1), (8, 2), (16, 4)])
def test_aux_loss_is_one_under_uniform_routing(n, k):
  """Uniform probabilities and perfectly balanced choices: N * sum f P = N * N * (1/N)(1/N) = 1,
  so the weighted loss equals its weight alpha."""
  t = 4 * n
  index = (jnp.arange(t * k).reshape(t, k)) % n  # every expert chosen t*k/n times
  probs = jnp.full((t, n), 1.0 / n)
  r = RouterOutput(expert_index=index, combine_weights=jnp.full((t, k), 1.0 / k), probs=probs,
                   logits=jnp.zeros((t, n)))
  assert float(losses.switch_aux_loss(r, n)) == pytest.approx(1.0, abs=1e-6)
