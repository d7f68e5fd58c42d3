"""python -m moejax.hf import --hf_dir=DIR --workdir=OUT [--dtype=float32|bfloat16] [--coordinator=...]
python -m moejax.hf export --workdir=OUT --hf_dir=DIR2 [--step=N] [--model_type=T] [--dtype=...]
python -m moejax.hf families

import: a Hugging Face folder (config.json + safetensors, one file or sharded with an index;
the tokenizer when there is one) -> a moejax workdir (with --config.x=v settings of its own,
e.g. --config.model.moe.router.freeze=true) (config.py, Orbax checkpoint at step 0)
that `python -m moejax.main --workdir=OUT` fine-tunes and `python -m moejax.generate
--workdir=OUT` samples from. export: a workdir's checkpoint -> a folder that
transformers.AutoModelForCausalLM.from_pretrained loads. families: every MoE model type of
transformers, imported or refused with the reason (a Markdown table). Families:
moejax/hf/families.py; refusals: moejax/hf/refused.py.
"""
from __future__ import annotations

import sys

from moejax.errors import ConfigError


def parser():
  from moejax import cli
  p = cli.ArgumentParser(prog='python -m moejax.hf', description=__doc__.split('\n\n')[0])
  sub = p.add_subparsers(dest='what', required=True, metavar='{import,export,families}',
                         help='import: a Hugging Face folder into a moejax workdir; export: a '
                         'workdir into a Hugging Face folder; families: what is imported and '
                         'what is refused, and why')
  sub.add_parser('families', help='every MoE model type: imported, or refused and why '
                 '(Markdown)', formatter_class=cli.HelpFormatter)
  imp = sub.add_parser('import', help='Hugging Face folder -> moejax workdir',
                       formatter_class=cli.HelpFormatter)
  imp.add_argument('--hf_dir', required=True, help='the Hugging Face folder: config.json and '
                   'safetensors (one file, or shards with their index), its tokenizer if any')
  imp.add_argument('--workdir', required=True, help='the moejax workdir to write (new or empty)')
  imp.add_argument('--tokenizer', default='', help='a tokenizer.json, its folder or a '
                   'SentencePiece .model, for a Hugging Face folder that has none')
  imp.add_argument('--dtype', default='float32', help='compute dtype: float32 or bfloat16 '
                   '(parameters stay float32 for training)')
  # Across hosts (run the same command on each): every process assembles and writes only its
  # devices' shards, so the checkpoint may be larger than any one host's memory.
  cli.add_distributed_args(imp)
  exp = sub.add_parser('export', help='moejax workdir -> Hugging Face folder',
                       formatter_class=cli.HelpFormatter)
  exp.add_argument('--workdir', required=True, help='a moejax run or imported workdir')
  exp.add_argument('--hf_dir', required=True, help='the Hugging Face folder to write (new)')
  exp.add_argument('--step', type=int, default=None, help='checkpoint step (None: the newest)')
  from moejax.hf.families import FAMILIES
  exp.add_argument('--model_type', default='',
                   help='the family, for a workdir not imported from Hugging Face: '
                   f'{", ".join(sorted(FAMILIES))}')
  exp.add_argument('--dtype', default='float32', help='float32 or bfloat16 weights')
  exp.add_argument('--shard_gb', type=float, default=5.0, help='safetensors shard size in GB')
  return p


def status_table() -> str:
  """A Markdown table of every MoE model type moejax knows of: imported, or refused and why."""
  from moejax.hf import convert, families, refused
  rows = {kind: 'imported' for kind in families.FAMILIES}
  rows.update({kind: f'imported: its language model (`{text}`)'
               for kind, (text, _) in convert.LANGUAGE_MODEL.items()})
  for table in refused.TABLES:
    rows.update({kind: f'refused: {refused.reason(kind)}' for kind in table})
  return '\n'.join(['| `model_type` | status |', '|---|---|'] +
                   [f'| `{kind}` | {rows[kind]} |' for kind in sorted(rows)]) + '\n'


def _main(argv=None) -> int:
  from moejax import cli
  p = parser()
  argv = sys.argv[1:] if argv is None else list(argv)
  rest, overrides = cli.split_overrides(argv)
  a = p.parse_args(rest)
  if overrides and a.what != 'import':
    raise ConfigError(f'--config.{overrides[0][0]}: config overrides apply to import only')
  if a.what == 'families':
    print(status_table(), end='')
    return 0
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from moejax.hf import convert, export
  if a.what == 'import':
    cli.init_distributed(a)
    from moejax.config import base_config, field_parent
    values = {}
    for key, text in overrides:  # typed as the field they set
      node, last = field_parent(base_config(), key, f'--config.{key}')
      values[key] = cli.parse_value(key, text, node[last])
    convert.import_workdir(a.hf_dir, a.workdir, a.dtype, overrides=values,
                           tokenizer=a.tokenizer)
  else:
    export.export_workdir(a.workdir, a.hf_dir, a.step, a.model_type, a.dtype,
                           int(a.shard_gb * 2**30))
  return 0


def main(argv=None) -> int:
  from moejax import cli
  return cli.run(_main, argv)


if __name__ == '__main__':
  sys.exit(main())
