"""`python -m moejax.compile --search`: for a config and a topology, compile the train step over
candidate mesh shapes (data, fsdp, expert, tensor), remat policies, dispatch paths and global
batch sizes, and rank those that fit by expected step time per token (report.py's roofline).

Candidates: every factorisation of the chips into the four axes that the config can run (the
expert axis divides the experts, the tensor axis the heads and KV heads, the batch splits over
data x fsdp x expert; with several slices the axes that span them, mesh.dcn_* or else data, split evenly over them), crossed with
--remats, --dispatches and --batches. Those whose train state alone (the planner's count, which
matches the compiler's; docs/pod.md) exceeds the chip's HBM are dropped without compiling. The
rest are compiled in the planner's order: least train state per chip first, then the smaller
tensor axis, no remat before full, the larger batch; at most --max_candidates of them. Every
compile's result is kept in --out/search_cache.json, so a rerun (or a wider search) compiles
only what is new.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import os

from tqdm import tqdm

from moejax.compile import chips, program, report as reports
from moejax.config import set_fields
from moejax.costs.planner import train_state_bytes_per_device
from moejax.errors import ConfigError
from moejax.model import schedule
from moejax.parallel.mesh import MESH_AXES


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def meshes(config, chips_total: int, batch: int, slices: int = 1) -> list[dict]:
  """Every {axis: size} over MESH_AXES multiplying to chips_total that the config can run."""
  m = config.model
  moe = schedule.has_moe(m)
  # The axes that span the slices (mesh.dcn_*; the data axis when none is set) must split
  # evenly over them.
  dcn_data, dcn_fsdp = int(config.mesh.get('dcn_data', 1)), int(config.mesh.get('dcn_fsdp', 1))
  if dcn_data * dcn_fsdp == 1:
    dcn_data = slices
  out = []
  for data, fsdp, expert in itertools.product(_divisors(chips_total), repeat=3):
    split = data * fsdp * expert  # the batch's split; the tensor axis takes the rest
    if chips_total % split or batch % split or data % dcn_data or fsdp % dcn_fsdp:
      continue
    tensor = chips_total // split
    if (moe and m.moe.num_experts % expert) or (not moe and expert > 1):
      continue
    if m.num_heads % tensor or m.num_kv_heads % tensor:
      continue
    sizes = {'data': data, 'fsdp': fsdp, 'expert': expert, 'tensor': tensor}
    out.append(sizes)
  return out


def _parse_list(text: str, flag: str, kind=str) -> list:
  try:
    values = [kind(x.strip()) for x in text.split(',') if x.strip()]
  except ValueError:
    raise ConfigError(f'--{flag}={text!r}: a comma-separated list of {kind.__name__}') from None
  if not values:
    raise ConfigError(f'--{flag}={text!r}: give at least one value')
  return values


def candidates(config, topology: chips.Topology, batches, remats, dispatches, hbm: float):
  """[(overrides, planned train-state bytes per chip)] that the planner says can fit, in the
  planner's order (module docstring)."""
  out = []
  for batch in batches:
    for sizes in meshes(config, topology.total_chips, batch, topology.slices):
      state = train_state_bytes_per_device(config.model, sizes)
      if state > hbm:
        continue
      for remat, dispatch in itertools.product(remats, dispatches):
        over = {**{f'mesh.{a}': sizes[a] for a in MESH_AXES}, 'model.remat': remat,
                'model.moe.dispatch.name': dispatch, 'train.batch_size': batch}
        out.append((over, state))
  out.sort(key=lambda c: (c[1], c[0]['mesh.tensor'], c[0]['model.remat'] != 'none',
                          -c[0]['train.batch_size'], -c[0]['mesh.expert']))
  return out


def _key(over: dict) -> str:
  return json.dumps(over, sort_keys=True)


def run(config, topology: chips.Topology, name: str, args) -> dict:
  """Compile the candidates and rank them; the report of --search."""
  batches = _parse_list(args.batches, 'batches', int) if args.batches else [
      config.train.batch_size]
  remats = _parse_list(args.remats, 'remats')
  dispatches = _parse_list(args.dispatches, 'dispatches')
  for b in batches:
    if b < 1:
      raise ConfigError(f'--batches: {b} is not a positive batch size')
  for r in remats:
    if r not in ('none', 'full'):
      raise ConfigError(f"--remats: {r!r}; the search tries 'none' and 'full' ('names' needs "
                        'model.remat_save: compile it directly)')
  from moejax.moe.registry import DISPATCHERS
  for d in dispatches:
    if d not in DISPATCHERS:
      raise ConfigError(f'--dispatches: {d!r} is not a dispatcher; one of {sorted(DISPATCHERS)}')
  hbm = chips.usable_hbm(topology)
  todo = candidates(config, topology, batches, remats, dispatches, hbm)
  if not todo:
    raise ConfigError(f'--search: no mesh of {topology.total_chips} chips holds the train state '
                      f'of this config in {hbm / 2**30:.1f} GiB per chip; try a larger --topology')
  cache_path = os.path.join(args.out, 'search_cache.json') if args.out else ''
  cache = {}
  if cache_path and os.path.exists(cache_path):
    with open(cache_path) as f:
      cache = json.load(f)
  rows = []
  for over, state in tqdm(todo[:args.max_candidates], desc='compiling candidates', unit='compile',
                          disable=None):
    key = _key(over)
    if key not in cache:
      c = set_fields(copy.deepcopy(config), over)
      try:
        t, (compiled,) = program.compile_config(c, topology, ('train',))
        cache[key] = reports.program_report(c, t, compiled, hbm)
      except ConfigError as e:
        cache[key] = {'refused': str(e)}
      if cache_path:
        os.makedirs(args.out, exist_ok=True)
        with open(cache_path, 'w') as f:
          json.dump(cache, f)
    rows.append({'overrides': over, 'planned_state_gib': round(state / 2**30, 3),
                 **cache[key]})
  fit = [r for r in rows if r.get('fits')]
  fit.sort(key=lambda r: r['roofline']['step_s'] / r['tokens_per_step'])
  rest = [r for r in rows if not r.get('fits')]
  header = {'config': name, 'topology': topology.name, 'slices': topology.slices,
            'chips': topology.total_chips, 'hbm_gib': round(hbm / 2**30, 2),
            'candidates': len(todo), 'compiled': len(rows)}
  best = fit[0]['overrides'] if fit else None
  return {'header': header, 'ranked': fit, 'did_not_fit': rest, 'best_overrides': best}


def _mesh_text(over: dict) -> str:
  return ' '.join(f"{a}={over[f'mesh.{a}']}" for a in MESH_AXES if over[f'mesh.{a}'] > 1) or \
      'one chip'


def markdown(report: dict) -> str:
  h = report['header']
  lines = [f"# Search: {h['config']} on {h['topology']}" + (
      f" x {h['slices']} slices" if h['slices'] > 1 else ''), '',
      f"{h['chips']} chips, {h['hbm_gib']} GiB usable HBM each; {h['candidates']} candidates "
      f"the planner lets through, {h['compiled']} compiled.", '',
      '| rank | mesh | remat | dispatch | batch | GiB per chip | step (ms) | tokens/s per chip '
      '| MFU | bound |', '|---:|---|---|---|---:|---:|---:|---:|---:|---|']
  for i, r in enumerate(report['ranked'], 1):
    o, rf = r['overrides'], r['roofline']
    lines.append(f"| {i} | {_mesh_text(o)} | {o['model.remat']} | "
                 f"{o['model.moe.dispatch.name']} | {o['train.batch_size']} | "
                 f"{r['memory_gib']['total']} | {rf['step_s'] * 1e3:.1f} | "
                 f"{rf['tokens_per_s_per_chip']:.0f} | {100 * rf['mfu']:.1f}% | {rf['bound']} |")
  for r in report['did_not_fit']:
    o = r['overrides']
    why = r.get('refused') or f"out of memory, needs {r.get('required_gib', '?')} GiB"
    lines.append(f"| - | {_mesh_text(o)} | {o['model.remat']} | {o['model.moe.dispatch.name']} "
                 f"| {o['train.batch_size']} | - | - | - | - | {why[:120]} |")
  if report['best_overrides']:
    flags = ' '.join(f'--config.{k}={v}' for k, v in report['best_overrides'].items())
    lines += ['', f'The winner: `{flags}`']
  else:
    lines += ['', 'No candidate fits: try a larger --topology, --remats=full or smaller '
              '--batches.']
  return '\n'.join(lines)
