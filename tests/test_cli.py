"""Every command reports a user error in one line (`error: ...`, naming the field or file and
the fix) with exit code 2, before anything compiles; --help, --print_config, named configs."""
import os
import pathlib
import subprocess
import sys

import pytest

from moejax import bench, experiment, generate, main as main_cmd, params, upcycle
from moejax.cli import apply_overrides, load_config, parse_value
from moejax.config import ConfigError, base_config
from moejax.training.loop import summary_line

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK = f'--config={ROOT / "configs" / "quickstart.py"}'


def _one_line_error(capsys, fn, argv, *expected):
  code = fn(argv)
  out, err = capsys.readouterr()
  lines = err.strip().splitlines()
  assert code == 2, (code, err)
  assert len(lines) == 1 and lines[0].startswith('error: '), err
  for text in expected:
    assert text in lines[0], (text, lines[0])
  return lines[0]


def test_main_user_errors(capsys, tmp_path):
  wd = f'--workdir={tmp_path / "run"}'
  a_file = tmp_path / 'a_file'
  a_file.write_text('x')
  empty = tmp_path / 'empty'
  empty.mkdir()
  cases = [
      ([QUICK, wd, '--config.train.stpes=10'], 'train.stpes', 'did you mean config.train.steps?'),
      ([QUICK, wd, '--config.model.moe.nmu_experts=4'],
       'did you mean config.model.moe.num_experts?'),
      (['--config=missing/conf.py', wd], 'no such file'),
      (['--config=quikstart', wd], "no shipped config of that name", "'quickstart'"),
      ([QUICK, f'--workdir={a_file}'], 'is a file'),
      ([QUICK, '--workdir=gs://bucket/run'], '--workdir=gs://bucket/run: a URL, not a folder',
       'Cloud Storage FUSE'),
      ([QUICK, wd, '--config.mesh.dcn_data=2'], 'config.mesh.dcn_data=2: the dcn axes span 2 '
       'processes but the devices are 1 process; make their product 1'),
      ([QUICK, wd, '--config.train.lr=nan'], 'config.train.lr=nan', 'finite'),
      ([QUICK, wd, '--config.train.lr=inf'], 'config.train.lr=inf', 'finite'),
      ([QUICK, wd, '--config.train.steps=abc'], 'must be a whole number'),
      ([QUICK, wd, '--config.train.nonfinite=ignore'], 'config.train.nonfinite'),
      ([QUICK, wd, '--config.data.source=files', f'--config.data.paths={empty}'],
       'config.data.file_glob', 'matches no file'),
      ([QUICK, wd, '--config.data.source=files', f'--config.data.paths={a_file}'],
       'config.data.paths', 'at least two files'),
      ([QUICK, wd, '--config.data.file_glob=*.nothing'], 'config.data.file_glob'),
      ([QUICK], '--workdir is required'),
      ([wd], '--config is required'),
      ([QUICK, wd, '--bogus'], 'unrecognized arguments: --bogus'),
  ]
  for argv, *expected in cases:
    _one_line_error(capsys, main_cmd.main, argv, *expected)
  assert not (tmp_path / 'run').exists()  # refused before anything was written, the folder too


def test_other_commands_user_errors(capsys, tmp_path):
  a_file = tmp_path / 'a_file'
  a_file.write_text('x')
  cases = [
      (generate.main, ['--workdir', str(tmp_path / 'none')], 'none: no such folder'),
      (generate.main, ['--workdir', str(a_file)], 'is a file'),
      (generate.main, ['--workdir', str(tmp_path), '--top_p=2'], '--top_p=2'),
      (params.main, [QUICK, '--config.model.d_modle=3'],
       'did you mean config.model.d_model?'),
      (params.main, [QUICK, '--mesh=experts=4'], "--mesh='experts=4'"),
      (experiment.main, ['nonexistent', '--workdir', str(tmp_path)],
       'no shipped experiment', "'balancing'"),
      (experiment.main, ['balancing', '--workdir', str(tmp_path),
                         '--config.model.moe.balance.aux_loss_weight=0.5'],
       'arm ', 'what the experiment compares'),
      (experiment.main, ['balancing', '--workdir', str(tmp_path), '--config.train.stps=5'],
       'did you mean config.train.steps?'),
      (upcycle.main, [QUICK, '--dense_workdir', str(tmp_path / 'nope'), '--workdir',
                      str(tmp_path / 'up')], '--dense_workdir', 'no such folder'),
      (upcycle.main, [QUICK, '--config.model.moe.num_expert=4', '--dense_workdir', 'x',
                      '--workdir', 'y'], 'did you mean config.model.moe.num_experts?'),
      (bench.main, ['moe', '--top_k', '99', '--experts', '8'], '--top_k=99'),
      (bench.main, ['moe', '--meshes', 'expert=x'], '--mesh='),
  ]
  for fn, argv, *expected in cases:
    _one_line_error(capsys, fn, argv, *expected)


def test_flags_take_either_spelling_and_params_checks_the_mesh_before_printing(capsys):
  """Flags are written with underscores; --a-b answers as --a_b in every command (and the
  reverse), overrides aside. params refuses a mesh before printing anything."""
  assert params.main([QUICK, '--mesh=expert=4', '--device-memory=40', '--decode-batch=2']) == 0
  dashed = capsys.readouterr().out
  assert params.main([QUICK, '--mesh=expert=4', '--device_memory=40', '--decode_batch=2']) == 0
  assert capsys.readouterr().out == dashed and '(4 devices of 40 GiB' in dashed
  _one_line_error(capsys, bench.main, ['moe', '--top-k', '99', '--experts', '8'], '--top_k=99')
  from moejax.routes.__main__ import parser as routes_parser  # a flag written with a dash
  assert routes_parser().parse_args(['--workdir', 'x', '--no_progress']).progress is False
  _one_line_error(capsys, params.main, [QUICK, '--device-memorys=4'], 'unrecognized')
  assert params.main([QUICK, '--mesh=expert=3']) == 2
  out, err = capsys.readouterr()
  assert out == '' and 'must divide model.moe.num_experts' in err


def test_jax_starts_quietly_on_a_host_without_a_tpu():
  """With libtpu installed (the tpu extra), jax looks for a TPU when it starts; importing
  moejax first keeps libtpu from printing errors on a host that has none (this one)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(('TPU_', 'JAX_PLATFORMS'))}
  code = 'import moejax, jax; print(jax.devices()[0].platform)'
  out = subprocess.run([sys.executable, '-c', code],
                       env=env, capture_output=True, text=True, cwd='/')
  assert out.returncode == 0 and out.stdout.strip() == 'cpu', out.stderr
  assert 'TPU' not in out.stderr and 'libtpu' not in out.stderr, out.stderr


def test_experiment_overrides_reach_every_arm(tmp_path, capsys):
  assert experiment.main(['balancing', '--workdir', str(tmp_path), '--config.train.lr=0.007',
                          '--print_config']) == 0
  assert 'lr: 0.007' in capsys.readouterr().out
  exp = experiment.override_base(experiment.load_experiment('balancing'),
                                 [('train.lr', '0.007')])
  assert all(experiment.run_config(exp, a, 0, False, r).train.lr == 0.007 for a in exp.arms
             for r in exp.rungs)
  # A field a rung of the ladder varies is refused, naming the rung.
  with pytest.raises(ConfigError, match="--config.train.steps: rung 'r0' sets this field"):
    experiment.override_base(experiment.load_experiment('balancing'), [('train.steps', '7')])


def test_a_smoke_experiment_compiles_cheaply_and_user_flags_win(capsys, monkeypatch):
  """--smoke puts XLA's cheapest optimisation flags first in XLA_FLAGS (read when jax starts
  its backend), the user's own after them, so the user's win."""
  from moejax.experiment.command import SMOKE_XLA_FLAGS
  monkeypatch.setenv('XLA_FLAGS', '--xla_backend_optimization_level=2')
  assert experiment.main(['balancing', '--smoke', '--print_config']) == 0
  assert os.environ['XLA_FLAGS'] == SMOKE_XLA_FLAGS + ' --xla_backend_optimization_level=2'
  monkeypatch.setenv('XLA_FLAGS', '')
  assert experiment.main(['balancing', '--print_config']) == 0
  assert os.environ['XLA_FLAGS'] == ''
  capsys.readouterr()


def test_help_print_config_and_named_configs():
  """Through `python -m` as a user runs it (one subprocess for the three)."""
  code = ('import sys, runpy; sys.argv = sys.argv[1:]; runpy.run_module("moejax.main", '
          'run_name="__main__")')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run([sys.executable, '-c', code, 'moejax.main', '--help'], env=env,
                       capture_output=True, text=True, cwd='/')
  assert out.returncode == 0 and 'moejax/config.py' in out.stdout
  out = subprocess.run([sys.executable, '-m', 'moejax.main', '--config=deepseek_v3:tiny',
                        '--config.train.steps=77', '--print_config'], env=env,
                       capture_output=True, text=True, cwd='/')  # no checkout in the cwd
  assert out.returncode == 0, out.stderr
  assert 'steps: 77' in out.stdout and "attention: mla" in out.stdout
  out = subprocess.run([sys.executable, '-m', 'moejax.main', '--config=quickstart',
                        '--workdir=/nonexistent/x', '--config.model.moe.nmu_experts=4'], env=env,
                       capture_output=True, text=True, cwd='/')
  assert out.returncode == 2 and out.stdout == ''
  assert out.stderr.strip().splitlines() == [
      "error: --config.model.moe.nmu_experts: config has no field 'model.moe.nmu_experts'; "
      'did you mean config.model.moe.num_experts?']


def test_override_values_are_typed():
  c = base_config()
  apply_overrides(c, [('train.steps', '12'), ('train.lr', '1e-4'), ('train.progress', 'false'),
                      ('model.moe.router.name', 'hash'), ('train.warmup_steps', '5.0')])
  assert (c.train.steps, c.train.lr, c.train.progress, c.model.moe.router.name,
          c.train.warmup_steps) == (12, 1e-4, False, 'hash', 5)
  with pytest.raises(ConfigError, match='must be true or false'):
    parse_value('train.progress', 'maybe', True)
  with pytest.raises(ConfigError, match='whole number'):
    parse_value('train.steps', '2.5', 3)
  with pytest.raises(ConfigError, match='did you mean config.model.moe'):
    apply_overrides(c, [('model.mo.num_experts', '4')])
  assert load_config('deepseek_v3:tiny').model.attention == 'mla'


def test_summary_lists_only_the_losses_that_are_on():
  c = base_config()
  c.model.moe.balance.aux_loss_weight, c.model.moe.balance.z_loss_weight = 0.0, 1e-3
  c.model.moe.balance.seq_aux_loss_weight = 1e-2
  last = {'step': 5, 'train/loss': 2.0, 'train/ce_loss': 1.9, 'moe/aux_loss': 1.0,
          'moe/z_loss': 3.0, 'moe/seq_aux_loss': 0.5, 'moe/device_loss': 1.0, 'eval/loss': 2.1}
  line = summary_line(last, c)
  assert line.startswith('final: step 5: train/loss 2')
  assert 'moe/z_loss 3' in line and 'moe/seq_aux_loss 0.5' in line and 'eval/loss 2.1' in line
  assert 'aux_loss 1' not in line and 'device_loss' not in line
  assert summary_line({**last, 'finished': True}, c).startswith(
      'finished: this run already reached step 5')


def _actions(parser):
  """Every flag of a parser and of its sub-commands: (parser prog, action)."""
  import argparse
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      for sub in action.choices.values():
        yield from _actions(sub)
    elif not isinstance(action, argparse._HelpAction):
      yield parser.prog, action


def test_every_flag_of_every_command_has_help_text():
  from moejax import main as train_cmd
  from moejax.bench import command as bench_cmd
  from moejax.experiment import command as experiment_cmd
  from moejax.hf import __main__ as hf_cmd
  from moejax.prepare import __main__ as prepare_cmd
  from moejax.routes import __main__ as routes_cmd
  parsers = [train_cmd.parser(), generate.parser(), upcycle.parser(), params.parser(),
             hf_cmd.parser(), prepare_cmd.parser(), bench_cmd.parser(), experiment_cmd.parser(),
             routes_cmd.parser()]
  seen = 0
  for p in parsers:
    for prog, action in _actions(p):
      seen += 1
      text = (action.help or '').strip()
      assert len(text.split()) >= 2, f'{prog} {action.option_strings or action.dest}: no help'
    formatted = p.format_help()
    assert '(default: None)' not in formatted
  assert seen > 60  # the commands' flags, sub-commands included
  assert '(default: 200)' in generate.parser().format_help()  # defaults shown


def test_experiment_list_and_seeds(capsys):
  assert experiment.main(['--list']) == 0
  out = capsys.readouterr().out
  assert 'token_vs_expert_choice:' in out and 'expert_threshold' in out and 'rungs: r0' in out
  assert experiment.main(['bias_rules', '--list']) == 0
  assert 'arm sign_1e-2' in capsys.readouterr().out
  from moejax.experiment.command import parse_seeds
  assert parse_seeds('3', (0, 1, 2, 3, 4)) == [0, 1, 2]
  assert parse_seeds('0,1', (0, 1, 2)) == [0, 1] and parse_seeds('4,', (0,)) == [4]
  with pytest.raises(ConfigError, match='--seeds=x'):
    parse_seeds('x', (0,))
