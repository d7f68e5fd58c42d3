"""What one compile says, per chip, as JSON and as Markdown: fits or not and by how much, memory
by kind beside the planner's estimate, collectives by kind and mesh axes, FLOPs and the
expected step time and MFU of a stated roofline.

The roofline (per chip, one step):
  compute    = executed FLOPs per chip / the chip's dense bf16 peak; executed FLOPs are the
               model FLOPs (moejax/costs/flops.py: 6 x matmul weights used per token + the
               attention) plus the recomputed forward under model.remat='full' (x 4/3);
               'names' recomputes part of it and is counted without (a lower bound);
  memory     = the compiler's bytes accessed (cost_analysis) / HBM bandwidth;
  collective = for each collective, the bytes a chip sends: all-gather and reduce-scatter
               B (n - 1) / n of the gathered size B over n chips, all-reduce 2 B (n - 1) / n,
               all-to-all and ragged all-to-all B (n - 1) / n of the buffer, collective-permute
               B; over the chip's bidirectional ICI bandwidth, or its DCN share for the
               collectives that cross slices.
  expected step time: between max(compute, memory, collective) (everything overlapped, the
  best the pod can do: `step_s`, `mfu_bound`) and compute + collective (nothing overlapped:
  `serial_step_s`, `mfu_serial`). MFU = model FLOPs / (step time x peak); the measured MFU of a
  well-tuned run lies below the bound (kernel efficiency is not modelled). The compiler's own
  `optimal_seconds` is not used: it comes out negative for whole train steps.
"""
from __future__ import annotations

import math

from moejax.compile import hlo
from moejax.costs.flops import flops_per_token
from moejax.costs.planner import train_state_bytes_per_device

GIB = 2 ** 30
_SENT = {'all-gather': lambda n: (n - 1) / n, 'reduce-scatter': lambda n: (n - 1) / n,
         'all-reduce': lambda n: 2 * (n - 1) / n, 'all-to-all': lambda n: (n - 1) / n,
         'ragged-all-to-all': lambda n: (n - 1) / n, 'collective-permute': lambda n: 1.0}


def _gib(b) -> float:
  return round(b / GIB, 3)


def collective_seconds(found, chip) -> tuple[float, float]:
  """(ICI seconds, DCN seconds) of a step's collectives on one chip (module docstring)."""
  ici = dcn = 0.0
  for c in found:
    n = max(c.group_size, 1)
    sent = c.bytes * c.runs * _SENT[c.kind](n) if n > 1 or c.kind == 'collective-permute' else 0
    if 'dcn' in c.axes:
      dcn += sent / (chip.dcn_gbps * 1e9)
    else:
      ici += sent / (chip.ici_gbps * 1e9)
  return ici, dcn


def tokens_per_step(config, program: str, decode_batch: int) -> int:
  if program == 'decode':
    return decode_batch or config.train.batch_size
  return config.train.batch_size * config.data.seq_len


def program_report(config, target, compiled, hbm_bytes: float, decode_batch: int = 0) -> dict:
  """One program's numbers per chip (see the module docstring)."""
  chip, n = target.topology.chip, target.topology.total_chips
  per_token = flops_per_token(config.model, config.data.seq_len)
  tokens = tokens_per_step(config, compiled.program, decode_batch)
  model_flops = (per_token['train'] if compiled.program == 'train' else
                 per_token['forward']) * tokens / n
  out = {'program': compiled.program, 'fits': compiled.fits,
         'compile_s': round(compiled.compile_s, 1), 'hbm_gib': _gib(hbm_bytes),
         'tokens_per_step': tokens, 'model_flops_per_chip': model_flops}
  mem = compiled.memory
  out['memory_gib'] = {k: _gib(v) for k, v in mem.items()}
  out['memory_bytes'] = dict(mem)
  if not compiled.fits:
    oom = compiled.oom or {}
    need = oom.get('required_bytes')
    out['oom'] = oom.get('message', '')
    out['oom_memory'] = oom.get('memory', 'hbm')
    if need is not None:
      out['required_gib'] = _gib(need)
      out['over_by_gib'] = _gib(need - oom.get('available_bytes', hbm_bytes))
    return out
  out['headroom_gib'] = _gib(hbm_bytes - mem['total'])
  out['hbm_used_fraction'] = round(mem['total'] / hbm_bytes, 3)
  if compiled.program == 'train':
    # The compiler's arguments are the train state and the batch, laid out in the TPU's tiles
    # (small or odd-sized arrays are padded); the planner counts the state's numbers.
    planned = train_state_bytes_per_device(config.model, target.sizes)
    actual = mem['arguments']
    out['planner'] = {'train_state_gib': _gib(planned), 'compiled_arguments_gib': _gib(actual),
                      'ratio': round(planned / actual, 3) if actual else None,
                      'leaves_out': 'activations and temporaries (they depend on batch, remat '
                                    'and sequence length)'}
  found = compiled.collectives
  out['collectives'] = hlo.summary(found)
  out['collectives_unknown_trips'] = sum(not c.trips_known for c in found)
  ici, dcn = collective_seconds(found, chip)
  recompute = 4 / 3 if compiled.program == 'train' and config.model.remat == 'full' else 1.0
  compute = model_flops * recompute / (chip.peak_tflops * 1e12)
  useful = model_flops / (chip.peak_tflops * 1e12)
  memory = compiled.cost.get('bytes accessed', 0.0) / (chip.hbm_gbps * 1e9)
  step = max(compute, memory, ici + dcn)
  out['cost_analysis'] = compiled.cost
  out['roofline'] = {'compute_s': compute, 'hbm_s': memory, 'ici_s': ici, 'dcn_s': dcn,
                     'step_s': step, 'serial_step_s': compute + ici + dcn,
                     'bound': max((('compute', compute), ('memory', memory),
                                   ('collectives', ici + dcn)), key=lambda kv: kv[1])[0],
                     'mfu': useful / step if step else None,
                     'mfu_serial': useful / (compute + ici + dcn) if compute else None,
                     'tokens_per_s_per_chip': tokens / n / step if step else None}
  return out


def header(config, target, config_name: str) -> dict:
  t = target.topology
  return {'config': config_name, 'topology': t.name, 'slices': t.slices,
          'chips': t.total_chips, 'torus': 'x'.join(map(str, t.shape)),
          'chip': t.chip.generation, 'mesh': target.sizes,
          'batch': config.train.batch_size, 'seq_len': config.data.seq_len,
          'dtype': config.model.dtype, 'remat': config.model.remat,
          'dispatch': config.model.moe.dispatch.name,
          'peak_tflops': t.chip.peak_tflops, 'hbm_gbps': t.chip.hbm_gbps,
          'ici_gbps': t.chip.ici_gbps, 'dcn_gbps': t.chip.dcn_gbps}


def _fmt_bytes(b: float) -> str:
  for unit, size in (('GiB', GIB), ('MiB', 2 ** 20), ('KiB', 2 ** 10)):
    if b >= size:
      return f'{b / size:.2f} {unit}'
  return f'{b:.0f} B'


def markdown(report: dict) -> str:
  """The report as Markdown: a header line, then per program memory, collectives, roofline."""
  h = report['header']
  mesh = ' x '.join(f'{a} {s}' for a, s in h['mesh'].items() if s > 1) or 'one chip'
  lines = [f"# {h['config']} on {h['topology']}" + (f" x {h['slices']} slices" if h['slices'] > 1
                                                    else ''),
           '',
           f"{h['chips']} chips of {h['chip']} ({h['torus']} per slice), mesh {mesh}; batch "
           f"{h['batch']} x {h['seq_len']}, {h['dtype']}, remat {h['remat']}, dispatch "
           f"{h['dispatch']}. Chip: {h['peak_tflops']:g} TFLOP/s bf16, HBM {h['hbm_gbps']:g} "
           f"GB/s, ICI {h['ici_gbps']:g} GB/s, DCN {h['dcn_gbps']:g} GB/s.", '']
  for p in report['programs']:
    lines.append(f"## {p['program']} step")
    lines.append('')
    mem = p['memory_gib']
    if not p['fits'] and p.get('oom_memory') == 'vmem':
      lines += [f"**Does not compile**: a kernel's tiles do not fit the chip's on-chip scratch "
                f"memory (VMEM) at these shapes, which is not the model's size; try another "
                f"`model.moe.experts.backend` or batch. After {p['compile_s']} s. The compiler: "
                f"`{p['oom'][:300]}`", '']
      continue
    if not p['fits']:
      need = f", needs {p['required_gib']} GiB, over by {p['over_by_gib']} GiB" if (
          'required_gib' in p) else ''
      lines += [f"**Does not fit** in {p['hbm_gib']} GiB per chip{need}; compiled in "
                f"{p['compile_s']} s. The compiler: `{p['oom'][:300]}`", '']
      continue
    if p['headroom_gib'] >= 0:
      room = f"{p['headroom_gib']} GiB free"
    else:
      room = (f"the sum of its buffers is {-p['headroom_gib']} GiB over, so the compiler "
              'reuses dead donated buffers: at the edge')
    lines += [f"**Fits** (the compiler accepted it): buffers {mem['total']} of {p['hbm_gib']} "
              f"GiB per chip ({100 * p['hbm_used_fraction']:.1f}%), {room}; compiled in "
              f"{p['compile_s']} s.", '',
              '| memory per chip | bytes |', '|---|---:|']
    for k in ('parameters', 'optimizer_state', 'model_state', 'arguments', 'temporaries',
              'outputs', 'aliased', 'generated_code', 'total'):
      lines.append(f'| {k.replace("_", " ")} | {_fmt_bytes(p["memory_bytes"].get(k, 0))} |')
    if 'planner' in p:
      pl = p['planner']
      lines += ['', f"Planner (`python -m moejax.params --mesh`): train state "
                f"{pl['train_state_gib']} GiB per chip against the compiler's arguments "
                f"{pl['compiled_arguments_gib']} GiB (state and batch; ratio {pl['ratio']}); it leaves out {pl['leaves_out']}."]
    lines += ['', '| collective | ops | runs per step | bytes per step per chip | over axes |',
              '|---|---:|---:|---:|---|']
    for kind, s in sorted(p['collectives'].items()):
      axes = ', '.join(f"{a or 'none'}: {_fmt_bytes(b)}" for a, b in s['by_axes'].items())
      lines.append(f"| {kind} | {s['ops']} | {s['runs']} | {_fmt_bytes(s['bytes'])} | {axes} |")
    if not p['collectives']:
      lines.append('| (none) | | | | |')
    r = p['roofline']
    lines += ['', f"Roofline per chip: compute {r['compute_s'] * 1e3:.2f} ms, HBM "
              f"{r['hbm_s'] * 1e3:.2f} ms, ICI {r['ici_s'] * 1e3:.2f} ms, DCN "
              f"{r['dcn_s'] * 1e3:.2f} ms; expected step {r['step_s'] * 1e3:.2f} ms "
              f"({r['bound']}-bound) to {r['serial_step_s'] * 1e3:.2f} ms (nothing overlapped);"
              f" MFU at most {100 * (r['mfu'] or 0):.1f}% (roofline bound; "
              f"{100 * (r['mfu_serial'] or 0):.1f}% with nothing overlapped), "
              f"{r['tokens_per_s_per_chip']:.0f} tokens/s per chip at the bound.", '']
  return '\n'.join(lines)


def fmt_step(p: dict) -> str:
  """A one-cell summary of a program: fits and the step time, or by how much it misses."""
  if not p['fits']:
    if p.get('oom_memory') == 'vmem':
      return 'kernel VMEM OOM'
    return f"OOM (+{p.get('over_by_gib', math.nan)} GiB)"
  return f"{p['roofline']['step_s'] * 1e3:.1f} ms"
