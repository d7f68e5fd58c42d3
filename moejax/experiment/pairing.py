"""Which runs of two arms compare, and how: paired by seed where the arms can pair (the baseline
ran every seed of the arm, with the same parameter shapes and data order), else as independent
samples; the comparisons of every arm with the baseline at one rung (statistics.py), at the last
completed look of a sequential design (sequential.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from moejax.experiment import statistics


def finished(results: list[dict]) -> list[dict]:
  """The results of runs that did not diverge."""
  return [r for r in results if 'diverged' not in r]


_SHAPES: dict = {}


def _param_shapes(model_cfg) -> tuple:
  """The parameter tree's paths and shapes (jax.eval_shape: nothing allocated)."""
  from moejax.model.transformer import Transformer
  key = str(model_cfg)
  if key not in _SHAPES:
    model = Transformer(ml_collections.FrozenConfigDict(model_cfg))
    tree = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
    _SHAPES[key] = tuple((jax.tree_util.keystr(p), tuple(getattr(v, 'value', v).shape))
                         for p, v in jax.tree_util.tree_leaves_with_path(
                             tree, is_leaf=lambda x: hasattr(x, 'value')))
  return _SHAPES[key]


def pairable(configs: dict, rung, arm: str, base: str) -> bool:
  """Whether two arms' runs pair by seed: the baseline ran every seed of the arm (it may have
  more, added for another arm until decided), the same parameter shapes (so the same initial
  parameters) and the same data order (data section, batch size)."""
  mine = {k.seed: c for k, c in configs.items() if k.rung == rung and k.arm == arm}
  theirs = {k.seed: c for k, c in configs.items() if k.rung == rung and k.arm == base}
  if not mine or not set(mine) <= set(theirs):
    return False
  a, b = next(iter(mine.values())), next(iter(theirs.values()))
  return (a.data.to_dict() == b.data.to_dict() and a.train.batch_size == b.train.batch_size
          and _param_shapes(a.model) == _param_shapes(b.model))


def aligned(results: dict, configs: dict, rung, arm: str, base: str, key: str, design=None):
  """(arm values, baseline values, paired) of a metric over the seeds both finished; with a
  sequential design, over the seeds of its last completed look (the first ones, in the order
  they were run: planned, then each round's)."""
  seeds = lambda a: [k.seed for k in configs if k.rung == rung and k.arm == a]  # noqa: E731
  va = dict(zip(seeds(arm), results.get(arm, [])))
  vb = dict(zip(seeds(base), results.get(base, [])))
  paired = pairable(configs, rung, arm, base)
  if paired:
    both = [s for s in va if s in vb]
    if design:
      both = both[:design.analysed(len(both))[0]]
    common = [s for s in both if 'diverged' not in va[s] and 'diverged' not in vb[s]
              and va[s].get(key) is not None and vb[s].get(key) is not None]
    return [va[s][key] for s in common], [vb[s][key] for s in common], True
  if design:
    n = design.analysed(min(len(va), len(vb)))[0]
    va, vb = dict(list(va.items())[:n]), dict(list(vb.items())[:n])
  ok = lambda d: [r[key] for r in d.values() if 'diverged' not in r and r.get(key) is not None]  # noqa: E731,E501
  return ok(va), ok(vb), False


def comparisons(exp, results: dict, configs: dict, rung, arms, design=None,
                key: str = 'val_loss', delta: float | None = None,
                lower_is_better: bool = True) -> dict:
  """{arm: statistics.Comparison} of each arm against the baseline on a metric (default: val
  loss, within the experiment's delta), with verdicts; with a sequential.Design, at its last
  completed look and corrected for its looks."""
  out = {}
  for arm in arms:
    if arm == exp.baseline:
      continue
    a, b, paired = aligned(results, configs, rung, arm, exp.baseline, key, design)
    if min(len(a), len(b)) >= 2:
      out[arm] = statistics.compare(a, b, exp.delta if delta is None else delta, paired)
  return statistics.verdicts(out, lower_is_better, looks=design.looks if design else 1)
