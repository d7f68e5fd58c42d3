"""`python -m moejax.bench accelerator --json --out=DIR`: one check of moejax on the machine it
runs on (a GPU or TPU; on CPU the same at small shapes, so CI keeps it working).

1. Numerics: every dispatch path and every dropless backend (blocked, ragged_dot, tokamax when
   installed), with the SwiGLU and the MLP expert blocks, against a loop-over-experts reference
   in outputs and gradients, in float32 and bfloat16; expert parallelism (all-to-all, ring) over
   the devices there are; and, from a checkout, the tests marked `accelerator` run by pytest on
   this platform.
2. The MoE layer's forward + backward at bfloat16 against the dense FFN with the same active
   parameters, for each backend, at 8, 64 and 256 experts (bench/moe.py), with the learned
   routing and with forced balanced routing.
3. A train step of a model of about 100M parameters (MoE) and of its dense equivalent, with
   tokens/s, model TFLOP/s per device and MFU (bench/train.py).
It writes DIR/accelerator.json (every row) and DIR/accelerator.md (the tables), and prints each
row as a JSON line.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from moejax import kernels
from moejax.config import base_config
from moejax.moe.layer import MoEFFN

# (experts, top-K, expert width as a share of the dense FFN) for the layer timings.
LAYER_SHAPES = ((8, 2, 1 / 2), (64, 8, 1 / 8), (256, 8, 1 / 8))


def _shapes(small: bool) -> dict:
  if small:  # CPU: the same cases at shapes that run in seconds
    return {'tokens': 512, 'seq': 128, 'd_model': 32, 'ffn': 128, 'reps': 1,
            'train': dict(batch=4, seq=64, d_model=64, heads=4, layers=2, experts=8,
                          expert_dim=64, top_k=2, shared=1)}
  return {'tokens': 16384, 'seq': 2048, 'd_model': 1024, 'ffn': 4096, 'reps': 10,
          # 8 layers of 16 experts of 512 (top-2, one shared) at d_model 512: 108M parameters
          'train': dict(batch=16, seq=1024, d_model=512, heads=8, layers=8, experts=16,
                        expert_dim=512, top_k=2, shared=1)}


def _backends() -> list[str]:
  return [b for b in ('blocked', 'ragged_dot', 'tokamax') if kernels.available(b)]


def _reference(tokens, index, weights, p, activation=None):
  """The loop-over-experts output: sum over a token's choices of gate x expert(x)."""
  out = np.zeros_like(tokens)
  for e in range(p['wo'].shape[0]):
    rows, slots = np.nonzero(index == e)
    if not len(rows):
      continue
    x = tokens[rows]
    if activation is None:
      h = x @ p['wi_0'][e]
      h = h / (1 + np.exp(-h)) * (x @ p['wi_1'][e])
    else:
      h = np.maximum(x @ p['wi'][e], 0)
    out[rows] += weights[rows, slots, None] * (h @ p['wo'][e])
  return out


def numerics(small: bool):
  """One row per (path, backend, block, dtype): the largest error of the output against the
  loop reference, relative to the output's scale, and the gradient's relative error against
  float32 autodiff of a dense all-experts formulation with the same choices; ok within the
  dtype's tolerance (float32: 1e-4 and 1e-4; bfloat16, 8 significant bits: 3e-2 and 5e-2)."""
  d, t = 32, 96
  x = jax.random.normal(jax.random.key(0), (2, t // 2, d))
  cot = jax.random.normal(jax.random.key(1), x.shape)
  n_dev = jax.device_count()
  paths = [('capacity', 'auto'), ('einsum', 'auto')] + [('dropless', b) for b in _backends()]
  if n_dev > 1:
    paths += [('all_to_all', 'auto'), ('ring', 'blocked')]
  for block in ('swiglu', 'mlp'):
    for dispatch, backend in paths:
      moe = base_config().model.moe
      moe.num_experts, moe.num_experts_per_tok, moe.expert_ffn_dim = 8, 2, 16
      moe.num_shared_experts, moe.experts.name = 0, block
      if block == 'mlp':
        moe.experts.activation = 'relu'
      moe.dispatch.name, moe.experts.backend = dispatch, backend
      moe.dispatch.capacity_factor = moe.dispatch.eval_capacity_factor = 100.0  # no drops
      moe.dispatch.group_size = 48
      frozen = ml_collections.FrozenConfigDict(moe)
      params = nn.unbox(MoEFFN(frozen, d).init(jax.random.key(2), x))
      for dtype in ('float32', 'bfloat16'):
        layer = MoEFFN(frozen, d, jnp.dtype(dtype))
        run = _on_mesh(lambda p, x, layer=layer: layer.apply(p, x), dispatch, n_dev)
        y, aux = run(params, x)
        pp = jax.tree.map(np.asarray, params['params'])
        tokens = np.asarray(x, np.float64).reshape(-1, d)
        logits = tokens @ pp['router']['w']
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        index = np.asarray(aux['expert_index'])
        weights = np.take_along_axis(probs, index, -1)
        weights /= weights.sum(-1, keepdims=True)
        ref = _reference(tokens, index, weights, pp['experts'],
                         'relu' if block == 'mlp' else None)
        err = float(np.max(np.abs(np.asarray(y, np.float64).reshape(-1, d) - ref)) /
                    (np.max(np.abs(ref)) + 1e-12))
        grad = _on_mesh(jax.grad(lambda p, x, layer=layer: jnp.sum(
            layer.apply(p, x)[0].astype(jnp.float32) * cot)), dispatch, n_dev)
        g = jax.tree.leaves(grad(params, x))
        chosen = jnp.asarray(index)
        g32 = jax.tree.leaves(jax.jit(jax.grad(lambda p, x: jnp.sum(
            _all_experts(p, x, chosen, block) * cot)))(params, x))
        # Per parameter, |g - g_float32| / |g_float32| (Frobenius norms); the largest. (A
        # ReLU block's derivative jumps where bfloat16 rounds a pre-activation across 0, so
        # single elements can differ a lot while the gradient as a whole agrees.)
        gerr = max(float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)) /
                         (np.linalg.norm(np.asarray(b, np.float64)) + 1e-12))
                   for a, b in zip(g, g32))
        tol = 1e-4 if dtype == 'float32' else 3e-2
        yield {'check': 'numerics', 'dispatch': dispatch, 'backend': backend, 'block': block,
               'dtype': dtype, 'devices': n_dev if dispatch in ('all_to_all', 'ring') else 1,
               'output_rel_err': float(f'{err:.3g}'), 'grad_rel_err': float(f'{gerr:.3g}'),
               'ok': bool(err < tol and gerr < (1e-4 if dtype == 'float32' else 5e-2))}


def _all_experts(params, x, index, block: str):
  """The MoE output as a dense formulation over every expert, the choices `index` fixed and
  the weights differentiable: the float32 gradient reference."""
  p = params['params']
  t = x.reshape(-1, x.shape[-1])
  probs = jax.nn.softmax(t @ p['router']['w'])
  w = jnp.take_along_axis(probs, index, -1)
  gate = jnp.zeros_like(probs).at[jnp.arange(t.shape[0])[:, None], index].set(
      w / w.sum(-1, keepdims=True))  # [T, N]
  e = p['experts']
  if block == 'mlp':
    h = jax.nn.relu(jnp.einsum('td,edf->tef', t, e['wi']))
  else:
    h = jax.nn.silu(jnp.einsum('td,edf->tef', t, e['wi_0'])) * jnp.einsum('td,edf->tef', t,
                                                                          e['wi_1'])
  return jnp.einsum('tef,efd,te->td', h, e['wo'], gate).reshape(x.shape)


def _on_mesh(fn, dispatch: str, n_dev: int):
  """fn jitted; the expert-parallel paths on a mesh of every device along 'expert'."""
  if dispatch not in ('all_to_all', 'ring') or n_dev == 1:
    return jax.jit(fn)
  from moejax.parallel.mesh import make_mesh
  mesh = make_mesh({'data': 1, 'fsdp': 1, 'expert': n_dev, 'tensor': 1})

  def run(*args):
    with jax.set_mesh(mesh):
      return jax.jit(fn)(*args)
  return run


def marked_tests():
  """The tests marked `accelerator`, run by pytest on this platform (a checkout only)."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  tests = os.path.join(root, 'tests')
  if not os.path.isdir(tests):
    return {'check': 'pytest -m accelerator', 'skipped': 'no tests folder (not a checkout)'}
  env = {**os.environ, 'JAX_PLATFORMS': jax.default_backend()}
  t0 = time.time()
  out = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-m', 'accelerator', '-p',
                        'no:cacheprovider', tests], cwd=root, env=env, capture_output=True,
                       text=True)
  tail = (out.stdout.strip().splitlines() or [''])[-1]
  return {'check': 'pytest -m accelerator', 'summary': tail, 'ok': out.returncode == 0,
          'seconds': round(time.time() - t0, 1)}


def layer_rows(small: bool):
  """bench moe at bfloat16 for every backend at 8, 64 and 256 experts, learned and balanced."""
  from moejax.bench.moe import bench_moe
  s = _shapes(small)
  for experts, k, share in LAYER_SHAPES:
    for routing in ('learned', 'balanced'):
      a = argparse.Namespace(
          tokens=s['tokens'], seq=s['seq'], d_model=s['d_model'], experts=experts, top_k=k,
          expert_dim=max(8, int(s['ffn'] * share)), shared=0, dtype='bfloat16', block_size=0,
          capacity_factors=[1.25], ragged_dot='ragged_dot' in _backends(),
          tokamax='tokamax' in _backends(), group_size=0, reps=s['reps'], routing=routing)
      for row in bench_moe(a):
        yield {'check': 'moe_layer', **row}


def train_rows(small: bool):
  """bench train: the MoE model of about 100M parameters and its dense equivalent, bfloat16."""
  from moejax.bench.train import bench_train
  a = argparse.Namespace(**_shapes(small)['train'], block_size=0, reps=3 if small else 10,
                         depths=[], dispatches=['dropless'], dtype='bfloat16', backend='auto',
                         peak_tflops=0.0)
  for row in bench_train(a):
    yield {'check': 'train_step', **row}


def markdown(rows: list[dict], header: dict) -> str:
  """The tables of the check."""
  lines = [f"# moejax accelerator check, {header['date']}", '',
           f"{header['devices']} x {header['device_kind']} ({header['platform']}), jax "
           f"{header['jax']}, tokamax {'installed' if header['tokamax'] else 'not installed'}; "
           f"command: `{header['command']}`; {header['seconds']:.0f} s.", '']
  num = [r for r in rows if r['check'] == 'numerics']
  if num:
    bad = [r for r in num if not r['ok']]
    lines += [f'## Numerics: {len(num) - len(bad)} of {len(num)} within tolerance', '',
              '| dispatch | backend | block | dtype | devices | output rel. err | grad rel. err '
              '| ok |', '|---' * 8 + '|']
    lines += [f"| {r['dispatch']} | {r['backend']} | {r['block']} | {r['dtype']} | "
              f"{r['devices']} | {r['output_rel_err']:.2e} | {r['grad_rel_err']:.2e} | "
              f"{'yes' if r['ok'] else '**no**'} |" for r in num]
    lines.append('')
  for r in rows:
    if r['check'] == 'pytest -m accelerator':
      lines += [f"Marked tests (`pytest -m accelerator`): {r.get('summary') or r.get('skipped')}",
                '']
  layer = [r for r in rows if r['check'] == 'moe_layer']
  if layer:
    lines += ['## MoE layer against the dense FFN (forward + backward, bfloat16)', '',
              '| experts | top-K | routing | case | ms | x dense | temp memory x dense |',
              '|---' * 7 + '|']
    lines += [f"| {r['experts']} | {r['top_k']} | {r['routing']} | {r['case']} | {r['ms']} | "
              f"{r['ratio_to_dense']} | {r['temp_ratio_to_dense']} |" for r in layer]
    lines.append('')
  train = [r for r in rows if r['check'] == 'train_step']
  if train:
    lines += ['## Train step (bfloat16)', '',
              '| case | parameters | active | tokens/s | x dense | TFLOP/s/device | MFU |',
              '|---' * 7 + '|']
    lines += [f"| {r['case']} | {r['params'] / 1e6:.1f}M | {r['active_params'] / 1e6:.1f}M | "
              f"{r['tokens_per_sec']} | {r['ratio_to_dense']} | {r['tflops_per_device']} | "
              f"{_percent(r['mfu'])} |" for r in train]
  return '\n'.join(lines) + '\n'


def _percent(value) -> str:
  return '-' if value is None else f'{100 * value:.1f}%'


def run(out_dir: str, small: bool | None = None, tests: bool = True, command: str = '',
        emit=print) -> dict:
  """Run the check, write DIR/accelerator.json and DIR/accelerator.md; returns the JSON."""
  small = jax.default_backend() == 'cpu' if small is None else small
  os.makedirs(out_dir, exist_ok=True)
  t0 = time.time()
  rows = []
  stages = [numerics(small), layer_rows(small), train_rows(small)]
  for stage in stages:
    for row in stage:
      rows.append(row)
      emit(json.dumps(row))
  if tests:
    rows.append(marked_tests())
    emit(json.dumps(rows[-1]))
  header = {'date': datetime.date.today().isoformat(), 'platform': jax.default_backend(),
            'device_kind': jax.devices()[0].device_kind, 'devices': jax.device_count(),
            'jax': jax.__version__, 'tokamax': kernels.available('tokamax'),
            'small_shapes': small, 'seconds': time.time() - t0,
            'command': command or 'python -m moejax.bench accelerator --json --out=DIR'}
  result = {'header': header, 'rows': rows}
  with open(os.path.join(out_dir, 'accelerator.json'), 'w') as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(out_dir, 'accelerator.md'), 'w') as f:
    f.write(markdown(rows, header))
  return result
