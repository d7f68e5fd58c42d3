"""`python -m moejax.compile --experiment=NAME[:ARG] --topology=T`: every (rung, arm) cell of an
experiment compiled for the topology (the seeds of a cell run the same programs): whether it
fits, its expected step time (report.py's roofline bound) and the expected time of the whole
experiment before anything is booked.

Expected time of a run = train.steps x the train step + its evaluations x the eval step:
train.steps // train.eval_every periodic evaluations of train.eval_batches batches, and the
final evaluation of train.final_eval_batches batches (0: the whole validation split, whose size
is not known without the data: counted as 200 batches and said so). Start-up, compilation and
checkpoints are not counted.
"""
from __future__ import annotations

from tqdm import tqdm

from moejax.compile import chips, program, report as reports
from moejax.errors import ConfigError

WHOLE_SPLIT_BATCHES = 200  # stands for final_eval_batches = 0 (the whole split)


def eval_batches_per_run(config) -> tuple[int, bool]:
  """(evaluation batches of one run, whether the final evaluation's size was assumed)."""
  t = config.train
  periodic = (t.steps // t.eval_every) * t.eval_batches if t.eval_every else 0
  final = {-1: 0, 0: WHOLE_SPLIT_BATCHES}.get(t.final_eval_batches, t.final_eval_batches)
  return periodic + final, t.final_eval_batches == 0


def run(spec: str, topology: chips.Topology, overrides: list) -> dict:
  """The report of --experiment (module docstring)."""
  from moejax.cli.args import apply_overrides
  from moejax.experiment.runner import load_experiment, run_config
  exp = load_experiment(spec)
  rungs = list(exp.rungs) or [None]
  hbm = chips.usable_hbm(topology)
  rows, total, assumed = [], 0.0, False
  cells = [(r, a) for r in rungs for a in exp.arms]
  for rung, arm in tqdm(cells, desc='compiling cells', unit='cell', disable=None):
    c = apply_overrides(run_config(exp, arm, 0, False, rung), overrides)
    seeds = len(exp.rung_seeds(rung))
    t, compiled = program.compile_config(c, topology, ('train', 'eval'))
    train, evals = (reports.program_report(c, t, x, hbm) for x in compiled)
    row = {'rung': rung, 'arm': arm, 'seeds': seeds, 'steps': c.train.steps,
           'batch': c.train.batch_size, 'seq_len': c.data.seq_len, 'train': train,
           'eval': evals}
    if train['fits'] and evals['fits']:
      batches, guessed = eval_batches_per_run(c)
      assumed |= guessed
      run_s = c.train.steps * train['roofline']['step_s'] + batches * evals['roofline']['step_s']
      row['run_s'] = run_s
      total += seeds * run_s
    rows.append(row)
  fits = all('run_s' in r for r in rows)
  return {'header': {'experiment': spec, 'topology': topology.name, 'chips':
                     topology.total_chips, 'hbm_gib': round(hbm / 2**30, 2),
                     'runs': sum(r['seeds'] for r in rows), 'cells': len(rows)},
          'cells': rows, 'all_fit': fits, 'expected_total_s': total if fits else None,
          'whole_split_assumed': assumed}


def markdown(report: dict) -> str:
  h = report['header']
  lines = [f"# {h['experiment']} on {h['topology']}", '',
           f"{h['cells']} cells (rung x arm), {h['runs']} runs; {h['chips']} chip(s) with "
           f"{h['hbm_gib']} GiB usable HBM each.", '',
           '| rung | arm | seeds | steps | batch x seq | GiB per chip | train step (ms) | '
           'eval step (ms) | one run (min) |', '|---|---|---:|---:|---|---:|---:|---:|---:|']
  for r in report['cells']:
    tr, ev = r['train'], r['eval']
    if 'run_s' not in r:
      lines.append(f"| {r['rung'] or '-'} | {r['arm']} | {r['seeds']} | {r['steps']} | "
                   f"{r['batch']} x {r['seq_len']} | {reports.fmt_step(tr)} | - | - | - |")
      continue
    lines.append(f"| {r['rung'] or '-'} | {r['arm']} | {r['seeds']} | {r['steps']} | "
                 f"{r['batch']} x {r['seq_len']} | {tr['memory_gib']['total']} | "
                 f"{tr['roofline']['step_s'] * 1e3:.2f} | {ev['roofline']['step_s'] * 1e3:.2f} | "
                 f"{r['run_s'] / 60:.2f} |")
  if report['all_fit']:
    note = (f" (the final evaluation over the whole split counted as "
            f"{WHOLE_SPLIT_BATCHES} batches)" if report['whole_split_assumed'] else '')
    lines += ['', f"Every cell fits. Expected time of the whole experiment at the roofline "
              f"bound: {report['expected_total_s'] / 60:.1f} min{note}; start-up, compilation "
              'and checkpoints not counted, and a real step is slower than its bound.']
  else:
    lines += ['', 'Some cells do not fit: see their rows.']
  return '\n'.join(lines)


def check_spec(spec: str):
  if not spec or ':' in spec and not spec.split(':', 1)[0]:
    raise ConfigError(f'--experiment={spec!r}: NAME or NAME:ARG, e.g. token_vs_expert_choice:tpu')
