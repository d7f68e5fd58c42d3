"""Routing analysis of a checkpoint: which experts serve which text, and how layers agree.

python -m moejax.routes --workdir=W [--eval_sets=NAME=DIR,...] [--out=DIR] [--trace=FILE]
    [--replay=FILE] [--layer=0] [--max_tokens=32768]

Works on a training run and on a Hugging Face import (python -m moejax.hf import) alike. Runs
the model's evaluation routing over each evaluation set (prepared folders' validation splits,
or the run's own validation split) and writes into --out (default W/routes): routes.md (tables
and plots), routes.json (every statistic), load.png, specialization.png, coactivation.png,
agreement.png, saturation.png (when the workdir keeps several checkpoints) and tokens.html (a
text sample coloured by top expert). --trace writes the routing (moejax/routes/trace.py);
--replay evaluates the model routed as a trace recorded and reports on that routing.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from moejax.errors import ConfigError


def parser():
  from moejax import cli
  p = cli.ArgumentParser(prog='python -m moejax.routes', description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True,
                 help='a training run or an imported Hugging Face model (its checkpoints)')
  p.add_argument('--eval_sets', default='', metavar='NAME=DIR,...',
                 help='prepared folders (python -m moejax.prepare, with the run\'s tokenizer) '
                 'whose validation splits are analysed, by name; default: the run\'s own '
                 'validation split(s)')
  p.add_argument('--out', default=None, help='the report\'s folder (default: WORKDIR/routes)')
  p.add_argument('--max_tokens', type=int, default=32768,
                 help='tokens routed per evaluation set at most: sequences of data.seq_len '
                 'sampled across the whole split (the same sample as training\'s evaluation)')
  p.add_argument('--batch', type=int, default=8, help='sequences per forward pass')
  p.add_argument('--layer', type=int, default=0,
                 help='the MoE layer (0: the first) of the token view and the vocabulary table')
  p.add_argument('--sample_tokens', type=int, default=400,
                 help='tokens shown in the token view (tokens.html); 0: no token view')
  p.add_argument('--trace', default=None, metavar='FILE',
                 help='write the routing (experts, gate weights, token ids; .npz) to FILE')
  p.add_argument('--replay', default=None, metavar='FILE',
                 help='a routing trace ([batch, seq, moe_layers, top_k] expert ids with the '
                 'token ids; moejax\'s or an inference engine\'s): evaluate the model routed as '
                 'recorded against its own routing, and report on the trace\'s routing')
  p.add_argument('--step', type=int, default=None,
                 help='the checkpoint analysed (default: the newest intact one)')
  p.add_argument('--saturation_checkpoints', type=int, default=8,
                 help='router saturation over at most this many of the workdir\'s checkpoints '
                 '(evenly spaced, the analysed one last); 0: none')
  p.add_argument('--progress', default=True, action=__import__('argparse').BooleanOptionalAction,
                 help='a progress bar')
  return p


def _check_flags(a) -> None:
  for flag in ('max_tokens', 'batch'):
    if getattr(a, flag) < 1:
      raise ConfigError(f'--{flag}={getattr(a, flag)}: must be at least 1')
  for flag in ('sample_tokens', 'saturation_checkpoints', 'layer'):
    if getattr(a, flag) < 0:
      raise ConfigError(f'--{flag}={getattr(a, flag)}: must be 0 or more')
  if os.path.exists(a.workdir) and not os.path.isdir(a.workdir):
    raise ConfigError(f'--workdir={a.workdir} is a file; give a training run\'s directory')
  if a.out and os.path.exists(a.out) and not os.path.isdir(a.out):
    raise ConfigError(f'--out={a.out} is a file; give a folder for the report')
  if a.trace and os.path.isdir(a.trace):
    raise ConfigError(f'--trace={a.trace} is a folder; give a file name (e.g. trace.npz)')
  if a.replay and a.eval_sets:
    raise ConfigError('--replay and --eval_sets: a replay runs on the trace\'s own tokens; '
                      'give one of them')


def _sets(a, config, workdir: str) -> dict:
  """{name: PackedChunks}: the evaluation sets analysed."""
  from moejax.data import pipeline
  if a.eval_sets:
    out = {}
    for name, path in (item.rpartition('=')[::2] for item in a.eval_sets.split(',')
                       if item.strip()):
      name = name or os.path.basename(os.path.normpath(path))
      if name in out:
        raise ConfigError(f'--eval_sets: two sets are named {name!r}; write NAME=DIR')
      chunks = pipeline.validation_chunks(path, config.data.seq_len, '--eval_sets')
      if not pipeline.same_tokenizer(path, workdir):
        raise ConfigError(f'--eval_sets: {path} was prepared with another tokenizer than '
                          f'{workdir} carries; prepare it with --tokenizer={workdir}')
      out[name] = chunks
    return out
  splits = pipeline.load_splits(config.data, config.seed, config.model.vocab_size,
                                validation_only=True)
  return {name or 'validation': chunks for name, chunks in splits.val.items()}


def _rows(chunks, max_tokens: int) -> np.ndarray:
  """Sequences of seq_len tokens (the chunks' model inputs) sampled across the split."""
  from moejax.data import pipeline
  count = min(len(chunks), max(1, max_tokens // chunks.seq_len))
  return np.stack([chunks[int(i)][:-1] for i in pipeline.eval_sample(len(chunks), count)])


def _main(argv=None) -> int:
  a = parser().parse_args(argv)
  _check_flags(a)
  from moejax.data import tokenizer as tokenizers
  from moejax.model.schedule import has_moe, moe_layer_ids
  from moejax.routes import trace as traces
  from moejax.training import workdir as workdirs
  tok = tokenizers.for_run(a.workdir)
  replay = traces.read(a.replay) if a.replay else None
  ckpt, steps = workdirs.checkpoints(a.workdir)
  try:
    config = workdirs.saved_config(ckpt, steps, a.step)
    model = config.model
    if not has_moe(model):
      raise ConfigError(f'--workdir={a.workdir}: the model has no MoE layer; nothing routes')
    layers = moe_layer_ids(model)
    if a.layer >= len(layers):
      raise ConfigError(f'--layer={a.layer}: the model has {len(layers)} MoE layers '
                        f'(0 to {len(layers) - 1})')
    if replay is not None:
      traces.check(replay, model, need_tokens=True)
      if replay.token_ids.shape[1] > model.max_seq_len:
        raise ConfigError(f'--replay={a.replay}: sequences of {replay.token_ids.shape[1]} '
                          f'tokens exceed model.max_seq_len={model.max_seq_len}')
      rows = {'trace': np.asarray(replay.token_ids, np.int32)}
    else:
      rows = {name: _rows(chunks, a.max_tokens) for name, chunks in
              _sets(a, config, a.workdir).items()}
    run = workdirs.open_run(workdirs.on_any_mesh(config))
    restored = workdirs.restore(run, ckpt, a.step)
    if restored is None:
      raise ConfigError(f'--workdir={a.workdir}: no intact checkpoint')
    step, state, _ = restored
    earlier = _saturation_steps(steps, step, a.saturation_checkpoints)
    first = next(iter(rows.values()))
    sat_rows = first[:max(1, min(len(first), 64))]
    total = sum(len(r) for r in rows.values()) * (2 if replay is not None else 1) + (
        len(sat_rows) * len(earlier))
    bar = None
    if a.progress:
      from tqdm.auto import tqdm
      bar = tqdm(total=total, desc='routes', unit='seq', dynamic_ncols=True, file=sys.stderr)
    update = bar.update if bar is not None else None
    result = _analyse(a, run, state, ckpt, rows, replay, earlier, sat_rows, update)
  finally:
    ckpt.close()
  if bar is not None:
    bar.close()
  return _write(a, config, step, tok, result)


def _saturation_steps(steps: list[int], step: int, most: int) -> list[int]:
  """Up to `most` - 1 earlier checkpoints (evenly spaced), for router saturation."""
  before = [s for s in steps if s < step]
  if most < 2 or not before:
    return []
  pick = np.unique(np.round(np.linspace(0, len(before) - 1, min(most - 1, len(before)))))
  return [before[int(i)] for i in pick]


def _analyse(a, run, state, ckpt, rows, replay, earlier, sat_rows, update) -> dict:
  from moejax.routes import analysis, collect
  from moejax.training import workdir as workdirs
  model = run.config.model
  n = model.moe.num_experts
  sets, losses, out = {}, {}, {}
  if replay is not None:
    got, own, diff = collect.collect_replay(run, state, rows['trace'], a.batch,
                                            replay.expert_index, update)
    sets['trace'], losses['trace'] = got.trace, got.row_loss
    out['replay'] = {
        'file': os.path.abspath(a.replay), 'loss_replayed': float(np.mean(got.row_loss)),
        'loss_own': float(np.mean(own.row_loss)),
        # Which experts, not in which slot: a trace may list a token's experts in any order.
        'agreement': analysis.saturation(replay.expert_index, own.trace.expert_index, n),
        'max_logit_diff': diff}
  else:
    for name, r in rows.items():
      got = collect.collect(run, state, r, a.batch, progress=update)
      sets[name], losses[name] = got.trace, got.row_loss
  saturation = None
  if earlier:
    final = sets[next(iter(sets))].expert_index[:len(sat_rows)]
    saturation = []
    for s in earlier:
      _, st, _ = workdirs.restore(run, ckpt, s)
      got = collect.collect(run, st, sat_rows, a.batch, progress=update)
      saturation.append((s, analysis.saturation(got.trace.expert_index, final, n)))
    saturation.append((int(state.step), 1.0))
  out.update(sets=sets, losses=losses, saturation=saturation)
  return out


def _write(a, config, step, tok, result) -> int:
  from moejax.routes import page, report, trace as traces
  model = config.model
  n = model.moe.num_experts
  out = a.out or os.path.join(a.workdir, 'routes')
  sets = result['sets']
  rep = report.analyse(sets, n, model.vocab_size, result['losses'], result['saturation'],
                       result.get('replay'))
  decode = lambda i: tok.decode([int(i)]) if int(i) < tok.vocab_size else f'<{int(i)}>'  # noqa: E731
  header = [f'Checkpoint: `{os.path.abspath(a.workdir)}` at step {step}; '
            f'{n} experts, {model.moe.num_experts_per_tok} per token '
            f'(router {model.moe.router.name!r}), MoE layers {rep["moe_layers"]}.',
            f'Command: `python -m moejax.routes --workdir={a.workdir}'
            + (f' --eval_sets={a.eval_sets}' if a.eval_sets else '')
            + (f' --replay={a.replay}' if a.replay else '')
            + (f' --max_tokens={a.max_tokens}' if a.max_tokens != 32768 else '') + '`.',
            'Evaluation routing (the model in evaluation mode); each set\'s sequences of '
            f'{next(iter(sets.values())).expert_index.shape[1]} tokens sampled across its '
            'whole validation split.' if a.replay is None else
            'Routing: as the trace recorded it.']
  page_name = None
  os.makedirs(out, exist_ok=True)
  if a.sample_tokens:
    first_name, first = next(iter(sets.items()))
    length = first.expert_index.shape[1]
    take = max(1, min(a.sample_tokens // length + 1, len(first.expert_index)))
    ids = first.token_ids[:take].reshape(-1)[:a.sample_tokens]
    experts = first.expert_index[:take, :, a.layer].reshape(-1, first.expert_index.shape[3])
    weights = first.weights[:take, :, a.layer].reshape(experts.shape)
    n_shown = len(ids)
    html = page.render([decode(i) for i in ids], experts[:n_shown], weights[:n_shown], n,
                       f'Top expert per token, MoE layer {a.layer} (model layer '
                       f'{rep["moe_layers"][a.layer]})',
                       f'{n_shown} tokens of the set {first_name!r}, step {step} of '
                       f'{os.path.abspath(a.workdir)}')
    page_name = 'tokens.html'
    with open(os.path.join(out, page_name), 'w', encoding='utf-8') as f:
      f.write(html)
  made = report.write(out, rep, header, decode, a.layer, page_name)
  if a.trace:
    every = traces.Trace(np.concatenate([t.expert_index for t in sets.values()]),
                         np.concatenate([t.token_ids for t in sets.values()]),
                         np.concatenate([t.weights for t in sets.values()]),
                         next(iter(sets.values())).moe_layers, n)
    traces.write(a.trace, every)
    print(f'trace: {a.trace} ({every.expert_index.shape[0]} sequences x '
          f'{every.expert_index.shape[1]} tokens x {every.expert_index.shape[2]} MoE layers x '
          f'{every.expert_index.shape[3]} experts)')
  for name, s in rep['sets'].items():
    print(f'{name}: {s["tokens_routed"]:,} tokens in {s["sequences"]:,} sequences, loss '
          f'{s["loss"]:.4f}')
  if 'replay' in rep:
    r = rep['replay']
    print(f'replay: loss {r["loss_replayed"]:.6f} routed as recorded, {r["loss_own"]:.6f} '
          f'routed by the model; {100 * r["agreement"]:.2f}% of the experts agree')
  ls = rep['layers']
  print(f'MaxVio across layers: median {ls["max_vio_across_layers"]["median"]:.3f}, max '
        f'{ls["max_vio_across_layers"]["max"]:.3f}; dead experts max '
        f'{ls["dead_experts_across_layers"]["max"]:g}')
  print(f'report: {os.path.join(out, made["md"])}')
  return 0


def main(argv=None) -> int:
  from moejax import cli
  return cli.run(_main, argv)


if __name__ == '__main__':
  sys.exit(main())
