"""The routing report: routes.json (every statistic), routes.md (tables, plots linked) and the
plots, from the traced routing of one checkpoint over named evaluation sets."""
from __future__ import annotations

import json
import os

import numpy as np

from moejax.routes import analysis

PLOT_LAYERS = 8  # heatmaps drawn for at most this many MoE layers (evenly spaced)


def analyse(sets: dict, n: int, vocab: int, losses: dict, saturation=None, replay=None) -> dict:
  """Every statistic of the report (routes.json).

  Args:
    sets: {name: Trace} the routing of each evaluation set (same MoE layers and K).
    n: the number of experts.
    vocab: the model's vocabulary size.
    losses: {name: [S] each sequence's mean next-token loss}.
    saturation: [(step, share)] router saturation over the run's checkpoints, or None.
    replay: the replay evaluation's numbers, or None.
  """
  index = np.concatenate([t.expert_index for t in sets.values()])
  tokens = np.concatenate([t.token_ids for t in sets.values()])
  out = {
      'num_experts': n, 'top_k': int(index.shape[3]), 'moe_layers': [int(x) for x in next(
          iter(sets.values())).moe_layers],
      'sets': {name: {'sequences': int(t.expert_index.shape[0]),
                      'tokens_routed': int(t.expert_index.shape[0] * t.expert_index.shape[1]),
                      'loss': float(np.mean(losses[name])),
                      'loss_se': float(np.std(losses[name], ddof=1) / np.sqrt(len(losses[name])))
                      if len(losses[name]) > 1 else None}
               for name, t in sets.items()},
      'layers': analysis.layer_stats(index, n),
      'domain_specialization': analysis.domain_specialization(
          {name: t.expert_index for name, t in sets.items()}, n),
      'vocabulary': analysis.vocabulary(index, tokens, n, vocab),
      'coactivation': analysis.coactivation(index, n).tolist(),
      'cross_layer_nmi': analysis.cross_layer_agreement(index),
  }
  if saturation:
    out['saturation'] = [{'step': int(s), 'share': float(v)} for s, v in saturation]
  if replay:
    out['replay'] = replay
  return out


def _layers_shown(m: int) -> list[int]:
  return sorted({int(round(x)) for x in np.linspace(0, m - 1, min(m, PLOT_LAYERS))})


def _pyplot():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def _save(plt, fig, out, name):
  from moejax.experiment.plots import fit_texts
  fit_texts(fig)
  fig.savefig(os.path.join(out, name), dpi=100)
  plt.close(fig)
  return name


def plots(out: str, report: dict) -> dict:
  """{what: file name} of the plots drawn into `out`."""
  plt = _pyplot()
  made = {}
  layers = report['moe_layers']
  load = np.asarray(report['layers']['load']) * report['num_experts']  # [M, N], 1 = even
  fig, ax = plt.subplots(figsize=(min(2 + 0.35 * load.shape[1], 14), 1.5 + 0.35 * len(layers)))
  im = ax.imshow(load, aspect='auto', cmap='viridis')
  ax.set_xlabel('expert'), ax.set_ylabel('MoE layer (model layer)')
  ax.set_yticks(range(len(layers)), [f'{i} ({l})' for i, l in enumerate(layers)])
  ax.set_title('expert load: share of routed slots x N (1 = even)')
  fig.colorbar(im, ax=ax)
  made['load'] = _save(plt, fig, out, 'load.png')

  shown = _layers_shown(len(layers))
  spec = report['domain_specialization']
  if len(spec) > 1:
    names = list(spec)
    fig, axes = plt.subplots(len(shown), 1, figsize=(min(2 + 0.35 * load.shape[1], 14),
                                                     0.6 + (0.4 + 0.3 * len(names)) * len(shown)),
                             squeeze=False)
    for ax, layer in zip(axes[:, 0], shown):
      grid = np.asarray([spec[name][layer] for name in names])  # [sets, N]
      im = ax.imshow(grid, aspect='auto', cmap='magma')
      ax.set_yticks(range(len(names)), names)
      ax.set_title(f'MoE layer {layer}: share of the set\'s routed slots x N', fontsize=9)
      fig.colorbar(im, ax=ax)
    axes[-1, 0].set_xlabel('expert')
    made['domain_specialization'] = _save(plt, fig, out, 'specialization.png')

  co = np.asarray(report['coactivation'])
  cols = min(4, len(shown))
  rows = -(-len(shown) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.1 * rows), squeeze=False)
  for ax in axes.ravel():
    ax.axis('off')
  for ax, layer in zip(axes.ravel(), shown):
    ax.axis('on')
    im = ax.imshow(co[layer], vmin=0, vmax=1, cmap='Blues')
    ax.set_title(f'MoE layer {layer}', fontsize=9)
    ax.set_xlabel('expert j', fontsize=8), ax.set_ylabel('expert i', fontsize=8)
  fig.suptitle('co-activation: share of expert i\'s tokens that expert j also serves')
  fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
  fig.savefig(os.path.join(out, 'coactivation.png'), dpi=100)
  plt.close(fig)
  made['coactivation'] = 'coactivation.png'

  nmi = report['cross_layer_nmi']
  if nmi:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(range(len(nmi)), nmi, marker='o')
    ax.set_xticks(range(len(nmi)), [f'{i}->{i + 1}' for i in range(len(nmi))])
    ax.set_ylim(0, 1.02), ax.set_xlabel('MoE layers'), ax.set_ylabel('NMI')
    ax.set_title("cross-layer agreement: NMI of consecutive layers' top experts")
    made['cross_layer_nmi'] = _save(plt, fig, out, 'agreement.png')

  if report.get('saturation'):
    sat = report['saturation']
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([s['step'] for s in sat], [s['share'] for s in sat], marker='o')
    ax.set_ylim(0, 1.02), ax.set_xlabel('checkpoint step')
    ax.set_ylabel('share equal to final')
    ax.set_title('router saturation: (token, layer) experts also chosen at the final step')
    made['saturation'] = _save(plt, fig, out, 'saturation.png')
  return made


def _show(piece: str) -> str:
  """A token's text for a Markdown table cell: escapes visible, pipes escaped."""
  text = json.dumps(piece, ensure_ascii=False)[1:-1]
  return '`' + text.replace('`', "'").replace('|', '\\|') + '`'


def markdown(report: dict, header: list[str], made: dict, decode, layer: int,
             page: str | None) -> str:
  """routes.md."""
  n, layers = report['num_experts'], report['moe_layers']
  ls = report['layers']
  md = ['# Routing report', '', *header, '']
  md += ['## Evaluation sets', '', '| set | sequences | tokens routed | loss (nats/token) |',
         '|---|---:|---:|---:|']
  for name, s in report['sets'].items():
    se = '' if s['loss_se'] is None else f' ± {s["loss_se"]:.4f}'
    md.append(f'| {name} | {s["sequences"]:,} | {s["tokens_routed"]:,} | {s["loss"]:.4f}{se} |')
  md += ['', 'Loss: the mean over sequences of each sequence\'s next-token loss within the '
         'routed tokens (± its standard error over sequences).', '']
  if 'replay' in report:
    r = report['replay']
    md += ['## Replay', '', f'The trace\'s routes replayed: loss {r["loss_replayed"]:.6f}; the '
           f'model routing itself: {r["loss_own"]:.6f}; {100 * r["agreement"]:.2f}% of the '
           f'trace\'s experts (per token and layer, in any slot) are the model\'s own choice; '
           f'the largest logit '
           f'difference between the two passes {r["max_logit_diff"]:.3g}.', '']
  md += ['## Load per layer', '', f'![expert load]({made["load"]})', '',
         f'| MoE layer (model layer) | MaxVio | load entropy (nats; even: {np.log(n):.3f}) | '
         'dead experts |', '|---|---:|---:|---:|']
  for i, l in enumerate(layers):
    md.append(f'| {i} ({l}) | {ls["max_vio"][i]:.3f} | {ls["load_entropy"][i]:.3f} | '
              f'{ls["dead_experts"][i]} |')
  for q in ('median', 'p90', 'max'):
    md.append(f'| **{q} across layers** | {ls["max_vio_across_layers"][q]:.3f} | '
              f'{ls["load_entropy_across_layers"][q]:.3f} | '
              f'{ls["dead_experts_across_layers"][q]:g} |')
  md += ['', 'MaxVio: (the busiest expert\'s slots - the mean) / the mean; dead: no slot at all '
         'in these tokens.', '']
  spec = report['domain_specialization']
  md += ['## Domain specialization', '']
  if len(spec) > 1:
    md += [f'![domain specialization]({made["domain_specialization"]})', '',
           'Each expert\'s share of a set\'s routed slots over the uniform share 1/N (1: no '
           'preference). Per set, its most preferred expert in each layer:', '',
           '| set | ' + ' | '.join(f'layer {i}' for i in range(len(layers))) + ' |',
           '|---|' + '---:|' * len(layers)]
    for name, grid in spec.items():
      g = np.asarray(grid)
      md.append(f'| {name} | ' + ' | '.join(f'e{int(np.argmax(row))} x{np.max(row):.2f}'
                                            for row in g) + ' |')
  else:
    md.append('One evaluation set: give several (--eval_sets=NAME=DIR,...) to compare them.')
  voc = report['vocabulary']['layers'][layer]
  md += ['', f'## Vocabulary specialization (MoE layer {layer})', '',
         f'Mean concentration (the share of a token id\'s occurrences that its most frequent '
         f'expert serves, weighted by count; 1: always that expert; {report["top_k"] / n:.3f} = '
         'K/N: spread evenly), per layer: ' + ', '.join(
             f'{v["mean_concentration"]:.3f}' for v in report['vocabulary']['layers']) + '.',
         '', '| expert | load share | most frequent tokens (count) |', '|---:|---:|---|']
  for e, top in enumerate(voc['top_tokens']):
    md.append(f'| {e} | {ls["load"][layer][e]:.3f} | ' +
              ', '.join(f'{_show(decode(i))} ({c})' for i, c in top[:6]) + ' |')
  md += ['', 'Most concentrated tokens (seen at least 5 times): ' + ', '.join(
      f'{_show(decode(i))} {c:.2f}' for i, c in voc['most_concentrated']), '']
  co = np.asarray(report['coactivation'])
  md += ['## Co-activation', '', f'![co-activation]({made["coactivation"]})', '']
  if report['top_k'] > 1:
    md += ['The most co-activated pair per layer (the share of expert i\'s tokens that '
           'expert j also serves):', '']
    for i in range(len(layers)):
      c = co[i].copy()
      np.fill_diagonal(c, -1)
      a, b = np.unravel_index(np.argmax(c), c.shape)
      md.append(f'- layer {i}: experts {a} -> {b}: {c[a, b]:.3f}')
  else:
    md.append('One expert per token: no two experts serve the same token.')
  nmi = report['cross_layer_nmi']
  md += ['', '## Cross-layer agreement', '']
  if nmi:
    md += [f'![agreement]({made["cross_layer_nmi"]})', '',
           'Normalised mutual information of consecutive MoE layers\' top experts (0: '
           'independent; 1: one determines the other): ' +
           ', '.join(f'{i}->{i + 1} {v:.3f}' for i, v in enumerate(nmi)) + '.']
  else:
    md.append('One MoE layer.')
  md += ['', '## Router saturation', '']
  if report.get('saturation'):
    md += [f'![saturation]({made["saturation"]})', '',
           '| checkpoint step | share of (token, layer) experts also chosen at the final step |',
           '|---:|---:|']
    md += [f'| {s["step"]} | {s["share"]:.3f} |' for s in report['saturation']]
  else:
    md.append('The workdir keeps one checkpoint (train.keep_checkpoints keeps more).')
  if page:
    md += ['', '## Token view', '', f'[{page}]({page}): a text sample, each token coloured by '
           f'its top expert at MoE layer {layer}; hover a token for its experts and weights.']
  return '\n'.join(md) + '\n'


def write(out: str, report: dict, header: list[str], decode, layer: int,
          page: str | None) -> dict:
  """routes.json, routes.md and the plots into out; returns {what: file name}."""
  os.makedirs(out, exist_ok=True)
  made = plots(out, report)
  tmp = os.path.join(out, 'routes.json.tmp')
  with open(tmp, 'w') as f:
    json.dump(report, f, indent=1)
  os.replace(tmp, os.path.join(out, 'routes.json'))
  with open(os.path.join(out, 'routes.md'), 'w', encoding='utf-8') as f:
    f.write(markdown(report, header, made, decode, layer, page))
  return {**made, 'json': 'routes.json', 'md': 'routes.md'}
