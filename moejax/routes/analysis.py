"""Statistics of a model's routing, from its traced expert choices (NumPy, no model needed).

Every function takes `expert_index` [S, L, M, K] (S sequences of L tokens, M MoE layers, K
slots; an index of N or more is a null slot, no expert) and the number of experts N. The
analyses are those routing papers show (OLMoE, Muennighoff et al. 2024; Megatron-Core's router
statistics): load, imbalance and dead experts per layer and their percentiles across layers;
domain and vocabulary specialization; co-activation; agreement between consecutive layers;
and router saturation over training.
"""
from __future__ import annotations

import numpy as np


def counts(index, n: int) -> np.ndarray:
  """[M, N] routed slots per expert in each layer (null slots left out)."""
  idx = np.asarray(index)
  m = idx.shape[2]
  flat = idx.transpose(2, 0, 1, 3).reshape(m, -1)  # [M, S*L*K]
  return np.stack([np.bincount(row[row < n], minlength=n)[:n] for row in flat]).astype(float)


def layer_stats(index, n: int) -> dict:
  """Per layer: each expert's share of the routed slots, MaxVio ((max - mean) / mean), the
  entropy of the load (nats; log N when even), dead experts (no slot at all); and across the
  layers the median, 90th percentile and maximum of each (Megatron's percentile view)."""
  c = counts(index, n)  # [M, N]
  share = c / np.maximum(c.sum(-1, keepdims=True), 1)
  mean = np.maximum(c.mean(-1), 1e-12)
  vio = (c.max(-1) - c.mean(-1)) / mean
  with np.errstate(divide='ignore', invalid='ignore'):
    entropy = -np.sum(np.where(share > 0, share * np.log(share), 0.0), axis=-1)
  dead = (c == 0).sum(-1)
  out = {'load': share.tolist(), 'max_vio': vio.tolist(), 'load_entropy': entropy.tolist(),
         'dead_experts': dead.tolist()}
  for key, values in (('max_vio', vio), ('load_entropy', entropy), ('dead_experts', dead)):
    out[f'{key}_across_layers'] = {'median': float(np.median(values)),
                                   'p90': float(np.percentile(values, 90)),
                                   'max': float(np.max(values))}
  return out


def domain_specialization(by_set: dict, n: int) -> dict:
  """{set: [M, N]}: each expert's share of a set's routed slots over the uniform share 1/N
  (1: no preference; N: the expert takes every slot of that set)."""
  out = {}
  for name, index in by_set.items():
    c = counts(index, n)
    out[name] = (c / np.maximum(c.sum(-1, keepdims=True), 1) * n).tolist()
  return out


def token_expert_counts(index, tokens, n: int, vocab: int) -> np.ndarray:
  """[M, vocab, N]: how often each token id was routed to each expert, per layer."""
  idx = np.asarray(index)
  tok = np.asarray(tokens)
  m, k = idx.shape[2], idx.shape[3]
  out = np.zeros((m, vocab, n + 1))
  ids = np.repeat(tok.reshape(-1), k)  # one per slot
  for layer in range(m):
    e = np.minimum(idx[:, :, layer, :].reshape(-1), n)
    np.add.at(out[layer], (ids, e), 1.0)
  return out[:, :, :n]


def vocabulary(index, tokens, n: int, vocab: int, top: int = 8, min_count: int = 5) -> dict:
  """Vocabulary specialization, per layer: each expert's most frequent tokens (ids and counts)
  and, per token id seen at least min_count times, the concentration of its routing: the share
  of its occurrences that its most frequent expert serves (1: always that expert; K / N:
  spread evenly, K of N experts per token). 'mean_concentration' weighs the ids by their
  counts."""
  tec = token_expert_counts(index, tokens, n, vocab)  # [M, V, N]
  occurrences = np.bincount(np.asarray(tokens).reshape(-1), minlength=vocab)[:vocab]  # [V]
  seen = np.nonzero(occurrences >= min_count)[0]
  out = []
  for layer in range(tec.shape[0]):
    t = tec[layer]
    per_expert = [[(int(i), int(t[i, e])) for i in np.argsort(-t[:, e], kind='stable')[:top]
                   if t[i, e] > 0] for e in range(n)]
    conc = t[seen].max(-1) / occurrences[seen] if len(seen) else np.zeros(0)
    order = seen[np.argsort(-conc, kind='stable')][:top]
    out.append({'top_tokens': per_expert,
                'mean_concentration': float(np.sum(conc * occurrences[seen]) /
                                            max(occurrences[seen].sum(), 1)),
                'most_concentrated': [(int(i), float(t[i].max() / occurrences[i]))
                                      for i in order]})
  return {'layers': out}


def coactivation(index, n: int) -> np.ndarray:
  """[M, N, N]: entry (i, j) is the share of the tokens routed to expert i that expert j also
  serves (the diagonal is 1 for every used expert)."""
  idx = np.asarray(index)
  m = idx.shape[2]
  out = np.zeros((m, n, n))
  for layer in range(m):
    x = idx[:, :, layer, :].reshape(-1, idx.shape[3])  # [T, K]
    onehot = np.zeros((x.shape[0], n + 1))
    np.put_along_axis(onehot, np.minimum(x, n), 1.0, axis=-1)
    onehot = onehot[:, :n]
    both = onehot.T @ onehot  # [N, N] tokens served by i and j
    out[layer] = both / np.maximum(np.diag(both)[:, None], 1)
  return out


def normalized_mutual_information(a, b) -> float:
  """NMI of two labelings of the same items: I(A; B) / mean(H(A), H(B)) (the arithmetic mean,
  scikit-learn's default); 1 when one determines the other one-to-one, 0 when independent."""
  a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
  _, ai = np.unique(a, return_inverse=True)
  _, bi = np.unique(b, return_inverse=True)
  joint = np.zeros((ai.max() + 1, bi.max() + 1))
  np.add.at(joint, (ai, bi), 1.0)
  p = joint / joint.sum()
  pa, pb = p.sum(1), p.sum(0)
  nz = p > 0
  mi = float(np.sum(p[nz] * np.log(p[nz] / (pa[:, None] * pb[None, :])[nz])))
  ha = float(-np.sum(pa[pa > 0] * np.log(pa[pa > 0])))
  hb = float(-np.sum(pb[pb > 0] * np.log(pb[pb > 0])))
  if ha + hb == 0:
    return 1.0
  return max(0.0, mi / ((ha + hb) / 2))


def cross_layer_agreement(index) -> list[float]:
  """[M - 1]: how predictable layer l + 1's choice is from layer l's: the NMI of the tokens'
  first-slot experts in consecutive MoE layers."""
  idx = np.asarray(index)
  return [normalized_mutual_information(idx[:, :, l, 0], idx[:, :, l + 1, 0])
          for l in range(idx.shape[2] - 1)]


def saturation(index, final, n: int) -> float:
  """Router saturation (OLMoE): the share of each (token, layer)'s experts at one checkpoint
  that are also its experts at the final one, averaged (1: the routing has settled)."""
  a, b = np.asarray(index), np.asarray(final)
  k = a.shape[-1]
  same = (a[..., :, None] == b[..., None, :]) & (a[..., :, None] < n)  # [S, L, M, K, K]
  real = np.maximum((b < n).sum(-1), 1)
  return float(np.mean(same.any(-1).sum(-1) / np.minimum(real, k)))
