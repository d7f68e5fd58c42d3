"""Sparse upcycling: start a MoE run from a trained dense checkpoint.

    python -m moejax.upcycle --config=configs/x.py --dense_workdir=runs/dense \
        --workdir=runs/upcycled [--mode=copy|slice] [--step=N]
    python -m moejax.main --config=configs/x.py --workdir=runs/upcycled   # continues training

The MoE config must describe the dense model's shape (d_model, layers, attention, vocab, dense
ffn_dim) with MoE FFNs after `first_k_dense` layers (every layer: moe_layer_freq=1). Layer l's
attention and norms are copied; its FFN becomes the experts:
- mode 'copy' (Komatsuzaki et al., 2022): every routed expert is the dense FFN
  (expert_ffn_dim == ffn_dim). With renormalised top-K weights the MoE layer then computes the
  dense FFN exactly, whatever the router says;
- mode 'slice': expert e is column slice e mod S of the dense FFN, S = ffn_dim / expert_ffn_dim
  (fine-grained experts cut from one FFN; the function is not preserved).
Shared experts start as a slice of the FFN with a zero output projection (silent at step 0),
the router and the loss-free bias start fresh, the optimizer state is new. The step counter and
the data iterator continue from the dense checkpoint, so "dense N steps + MoE M steps" is one
run of N + M steps on the same data order.
"""
from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from moejax.errors import ConfigError
from moejax.model.schedule import moe_layer_ids
from moejax.nn import names
from moejax.training import workdir as workdirs
from moejax.training.checkpoint import Checkpointer
from moejax.training.step import Trainer, TrainState

MODES = ('copy', 'slice')
# Fields the dense and MoE configs must share (the copied arrays' shapes, the data order).
_SHARED = ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
           'attention', 'ffn_dim', 'tie_embeddings')


def check(dense, moe_cfg, mode: str):
  """Errors name the field and the fix, before anything is restored or written."""
  if mode not in MODES:
    raise ConfigError(f'--mode={mode!r}: must be one of {list(MODES)}')
  d, m = dense.model, moe_cfg.model
  if moe_layer_ids(d):
    raise ConfigError('--dense_workdir: its checkpoint already has MoE layers (model.'
                      f'first_k_dense={d.first_k_dense} < num_layers={d.num_layers}); upcycle '
                      'a dense model (first_k_dense >= num_layers)')
  for f in _SHARED:
    if d[f] != m[f]:
      raise ConfigError(f'config.model.{f}={m[f]!r} but the dense checkpoint has {d[f]!r}: '
                        'the MoE config must keep the dense shape')
  if d.attention == 'mla' and d.mla.to_dict() != m.mla.to_dict():
    raise ConfigError('config.model.mla.* differs from the dense checkpoint: keep it')
  if any(m.linear_pattern) or any(d.linear_pattern):
    raise ConfigError(f'config.model.linear_pattern={tuple(m.linear_pattern)}: upcycling copies '
                      'one stack of identical layers, so it does not yet take linear-attention '
                      'layers; set it to ()')
  if m.moe_layer_freq != 1 or not moe_layer_ids(m):
    raise ConfigError(f'config.model.moe_layer_freq={m.moe_layer_freq}: upcycling needs MoE '
                      'FFNs in every layer after first_k_dense (moe_layer_freq=1, '
                      'first_k_dense < num_layers)')
  if m.moe.experts.name != 'swiglu':
    raise ConfigError(f'config.model.moe.experts.name={m.moe.experts.name!r}: upcycling copies '
                      "the dense SwiGLU FFN into the experts, so they must be 'swiglu'")
  w, f = m.moe.expert_ffn_dim, d.ffn_dim
  if mode == 'copy' and w != f:
    raise ConfigError(f'config.model.moe.expert_ffn_dim={w}: mode copy makes each expert the '
                      f'dense FFN, so it must equal the dense ffn_dim {f} (or use --mode=slice)')
  if mode == 'slice' and f % w:
    raise ConfigError(f'config.model.moe.expert_ffn_dim={w}: mode slice cuts the dense FFN '
                      f'(width {f}) into equal slices, so it must divide {f}')
  if m.moe.num_shared_experts * w > f:
    raise ConfigError(f'config.model.moe.num_shared_experts={m.moe.num_shared_experts}: the '
                      f'shared experts (width {m.moe.num_shared_experts * w}) must fit in the '
                      f'dense FFN width {f}')
  if dense.data.to_dict() != moe_cfg.data.to_dict() or (
      dense.train.batch_size, dense.seed) != (moe_cfg.train.batch_size, moe_cfg.seed):
    raise ConfigError('config.data / train.batch_size / seed differ from the dense run: the '
                      'data iterator continues where the dense run stopped, so keep them')


def upcycle_params(dense: dict, fresh: dict, moe_model, mode: str) -> dict:
  """Dense params + a freshly initialised MoE model's params -> the upcycled MoE params."""
  dense, fresh = nn.unbox(dense), nn.unbox(fresh)
  k = moe_model.first_k_dense
  w, n = moe_model.moe.expert_ffn_dim, moe_model.moe.num_experts
  src = dense[names.DENSE_STACK][names.DENSE_BLOCK]  # leaves [num_layers, ...]
  out = jax.tree.map(np.asarray, fresh)
  for name in ('embedding', 'head', 'final_norm'):
    if name in dense:
      out[name] = jax.tree.map(np.asarray, dense[name])
  if k:
    out[names.DENSE_STACK][names.DENSE_BLOCK] = jax.tree.map(lambda a: np.asarray(a)[:k], src)
  block = out[names.MOE_STACK][names.MOE_BLOCK]
  for name in ('attn', 'attn_norm', 'ffn_norm'):
    block[name] = jax.tree.map(lambda a: np.asarray(a)[k:], src[name])
  ffn = {key: np.asarray(v)[k:] for key, v in src[names.FFN].items()}  # wi [L, d, f]; wo [L, f, d]
  slices = ffn['wi_0'].shape[-1] // w
  pick = [0] * n if mode == 'copy' else [e % slices for e in range(n)]

  def cut(s, wi_0, wi_1, wo):
    cols = slice(s * w, (s + 1) * w)
    return wi_0[..., cols], wi_1[..., cols], wo[:, cols, :]

  parts = [cut(s, ffn['wi_0'], ffn['wi_1'], ffn['wo']) for s in pick]
  experts = block[names.MOE][names.EXPERTS]
  for i, key in enumerate(('wi_0', 'wi_1', 'wo')):
    experts[key] = np.stack([p[i] for p in parts], axis=1).astype(experts[key].dtype)
  if names.SHARED in block[names.MOE]:
    shared = block[names.MOE][names.SHARED]
    width = shared['wi_0'].shape[-1]
    shared['wi_0'] = ffn['wi_0'][..., :width].astype(shared['wi_0'].dtype)
    shared['wi_1'] = ffn['wi_1'][..., :width].astype(shared['wi_1'].dtype)
    shared['wo'] = np.zeros_like(shared['wo'])  # silent until trained: the start is the copy
  return out


def upcycle(config, dense_workdir: str, workdir: str, mode: str = 'copy',
            step: int | None = None) -> int:
  """Write the upcycled MoE checkpoint into workdir; returns its step."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'--workdir={workdir} is a file; give a new directory')
  source, steps = workdirs.checkpoints(dense_workdir, '--dense_workdir')
  step = steps[-1] if step is None else step
  if os.path.isdir(os.path.join(workdir, 'checkpoints')) and Checkpointer(
      workdir, 1).latest_step() is not None:
    source.close()
    raise ConfigError(f'--workdir={workdir!r} already holds checkpoints; upcycle into a new '
                      'workdir (nothing there was changed)')
  try:
    dense = workdirs.saved_config(source, steps, step)
    check(dense, config, mode)
    run = workdirs.open_run(config)
    dense_run = workdirs.Run(dense, run.mesh, Trainer(dense, run.mesh))
    _, dense_state, data_state = workdirs.restore(dense_run, source, step)
  finally:
    source.close()
  trainer = run.trainer
  fresh = trainer.init(config.seed)
  params = upcycle_params(jax.device_get(dense_state.params), jax.device_get(fresh.params),
                          config.model, mode)
  shard = trainer.state_sharding
  with trainer.context():
    params = jax.device_put(params, shard.params)
    opt_state = jax.jit(trainer.tx.init, out_shardings=shard.opt_state)(params)
  state = TrainState(step=jax.device_put(jnp.asarray(step, jnp.int32), shard.step),
                     params=params, opt_state=opt_state, model_state=fresh.model_state)
  target = Checkpointer(workdir, config.train.keep_checkpoints)
  target.save(step, state, data_state, config.to_dict())
  target.wait()
  target.close()
  with open(os.path.join(workdir, 'upcycled_from.json'), 'w') as f:
    json.dump({'dense_workdir': os.path.abspath(dense_workdir), 'step': step, 'mode': mode}, f)
  return step


def parser():
  from moejax import cli
  p = cli.ArgumentParser(prog='python -m moejax.upcycle', description=__doc__.split('\n')[0])
  cli.add_config_args(p, what='MoE config')
  p.add_argument('--dense_workdir', required=True,
                 help='the dense run to start from (a workdir with checkpoints)')
  p.add_argument('--workdir', required=True, help='the new MoE run (a new folder)')
  p.add_argument('--mode', default='copy', choices=MODES,
                 help='copy: every expert is the dense FFN; slice: experts are column slices '
                 'of it')
  p.add_argument('--step', type=int, default=None,
                 help='the dense checkpoint step (None: the newest)')
  return p


def _main(argv=None) -> int:
  from moejax import cli
  p = parser()
  args, config = cli.parse(p, argv)
  step = upcycle(config, args.dense_workdir, args.workdir, args.mode, args.step)
  print(f'upcycled {args.dense_workdir} step {step} -> {args.workdir} ({args.mode}); continue '
        f'with: python -m moejax.main --config={args.config} --workdir={args.workdir}'
        ' (and the same --config.x=v overrides)')
  return 0


def main(argv=None) -> int:
  from moejax import cli
  return cli.run(_main, argv)


if __name__ == '__main__':
  sys.exit(main())
