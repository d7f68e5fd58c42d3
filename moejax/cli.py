"""What every command shares: config files by path or by name, `--config.x.y=v` overrides,
`--print_config`, and user errors reported in one line with exit code 2.

A config is a Python file whose `get_config()` (or `get_config(arg)` for `path.py:arg`) returns
the ml_collections ConfigDict of `moejax.config.base_config()` with some fields changed. It is
named by path (`configs/quickstart.py`, `my/exp.py:tiny`) or, for the configs that ship with
moejax (installed as the package `moejax.configs`, so a wheel without a checkout has them), by
name (`quickstart`, `deepseek_v3:tiny`).
"""
from __future__ import annotations

import argparse
import ast
import importlib.resources
import importlib.util
import os
import sys

import ml_collections

from moejax.config import ConfigError, field_parent

CONFIG_HELP = ('Every config field, its default and what it means: moejax/config.py '
               '(base_config). Override any of them with --config.SECTION.FIELD=VALUE, e.g. '
               '--config.train.steps=50; --print_config prints the resolved config and exits.')


class Diverged(RuntimeError):
  """Training met a non-finite loss or gradient (train.nonfinite='stop', or too many skips)."""


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors are one line (`error: ...`) with exit code 2."""

  def error(self, message):
    raise ConfigError(f'{message} (see {self.prog} --help)')


def shipped_names(package: str, skip=()) -> list[str]:
  """The modules a package of moejax ships (its configs, its experiments), by name."""
  return sorted(f.name[:-3] for f in importlib.resources.files(package).iterdir()
                if f.name.endswith('.py') and f.name not in ('__init__.py', *skip))


def shipped_path(spec: str, package: str, what: str, skip=()) -> str:
  """A file path as it is, or the name of a module `package` ships -> its file."""
  if os.path.isfile(spec):
    return spec
  if os.sep not in spec and not spec.endswith('.py'):
    shipped = importlib.resources.files(package) / f'{spec}.py'
    if shipped.is_file():
      return str(shipped)
  raise ConfigError(f'{what}={spec}: no such file, and no shipped {what.lstrip("-")} of that '
                    f'name; give a path or one of {shipped_names(package, skip)}')


def named_configs() -> list[str]:
  return shipped_names('moejax.configs', _NOT_CONFIGS)


_NOT_CONFIGS = ('published.py',)


def config_path(spec: str) -> tuple[str, str]:
  """'configs/x.py[:arg]' or a shipped config's name 'x[:arg]' -> (file path, arg)."""
  path, _, arg = spec.partition(':')
  return shipped_path(path, 'moejax.configs', '--config', _NOT_CONFIGS), arg


def load_module(path: str, what: str = '--config'):
  """Import a Python file by path (its folder is importable while it runs)."""
  if not os.path.isfile(path):
    raise ConfigError(f'{what}={path}: no such file')
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f'moejax_user_{name}', path)
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001  a user's file: report it in one line
    raise ConfigError(f'{what}={path}: {_one_line(e)}') from e
  finally:
    sys.path.pop(0)
  return module


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The config that `spec`'s get_config() returns."""
  path, arg = config_path(spec)
  module = load_module(path)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'--config={spec}: {path} defines no get_config()')
  try:
    return module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # noqa: BLE001
    raise ConfigError(f'--config={spec}: get_config failed: {_one_line(e)}') from e


def _one_line(e: BaseException) -> str:
  where = ''
  if isinstance(e, SyntaxError):
    where = f' (line {e.lineno})'
  return f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}{where}'


def parse_value(key: str, text: str, current):
  """A command-line string as the type of the field it replaces."""
  def bad(kind):
    return ConfigError(f'--config.{key}={text}: must be {kind} (the field is '
                       f'{type(current).__name__}, default {current!r})')
  if isinstance(current, bool):
    low = text.lower()
    if low in ('true', '1', 'yes'):
      return True
    if low in ('false', '0', 'no'):
      return False
    raise bad('true or false')
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      try:
        f = float(text)
      except ValueError:
        raise bad('a whole number') from None
      if f.is_integer():
        return int(f)
      raise bad('a whole number') from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise bad('a number') from None
  if isinstance(current, (tuple, list)):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      raise bad('a Python list or tuple') from None
    return type(current)(value if isinstance(value, (tuple, list)) else (value,))
  if current is None:
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
  return text


def apply_overrides(config, overrides: list[tuple[str, str]]):
  """Set each dotted field from its command-line text; unknown fields get 'did you mean'."""
  for key, text in overrides:
    node, last = field_parent(config, key, f'--config.{key}')
    node[last] = parse_value(key, text, node[last])
  return config


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """Separate `--config.a.b=v` / `--config.a.b v` from the other arguments."""
  rest, overrides, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith('--config.'):
      key, eq, value = arg[len('--config.'):].partition('=')
      if not eq:
        if i + 1 >= len(argv):
          raise ConfigError(f'{arg}: needs a value ({arg}=VALUE)')
        value, i = argv[i + 1], i + 1
      overrides.append((key, value))
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def add_config_args(parser: argparse.ArgumentParser, what: str = 'config'):
  parser.add_argument('--config', required=False, metavar='FILE[:ARG] | NAME[:ARG]',
                      help=f'the {what}: a config file (e.g. configs/quickstart.py or '
                      'configs/deepseek_v3.py:tiny) or the name of a shipped one (quickstart, '
                      'deepseek_v3:tiny)')
  parser.add_argument('--print_config', action='store_true',
                      help='print the resolved config (after overrides) and exit')
  if parser.epilog is None:
    parser.epilog = CONFIG_HELP


def parse(parser: argparse.ArgumentParser, argv=None, config_required: bool = True):
  """(args, config or None): argparse flags plus the config with its overrides applied."""
  argv = sys.argv[1:] if argv is None else list(argv)
  rest, overrides = split_overrides(argv)
  args = parser.parse_args(rest)
  config = None
  if args.config:
    config = apply_overrides(load_config(args.config), overrides)
  elif config_required:
    raise ConfigError(f'--config is required (a config file or one of {named_configs()}; see '
                      f'{parser.prog} --help)')
  elif overrides:
    raise ConfigError(f'--config.{overrides[0][0]}: overrides need --config')
  if args.print_config:
    if config is None:
      raise ConfigError('--print_config needs --config')
    print(config)
    raise SystemExit(0)
  return args, config


def run(main_fn, argv=None) -> int:
  """Call main_fn(argv); user errors -> one line on stderr and exit code 2, a diverged run -> 3."""
  try:
    code = main_fn(argv)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except Diverged as e:
    print(f'error: {e}', file=sys.stderr)
    return 3
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    return 130
  return code or 0


def add_distributed_args(p):
  """The flags that join a multi-controller run (python -m moejax.main, hf import)."""
  p.add_argument('--distributed', action='store_true', help='join the other hosts with '
                 'jax.distributed.initialize() auto-detection')
  p.add_argument('--coordinator', default='', help='HOST:PORT of process 0 (explicit setup)')
  p.add_argument('--num_processes', type=int, default=0, help='processes in the run')
  p.add_argument('--process_id', type=int, default=-1, help='this process (0..N-1)')


def init_distributed(args):
  """Join the multi-controller run before any JAX computation, if asked to."""
  if not (args.distributed or args.coordinator):
    return
  import jax
  # CPU hosts reduce across processes through gloo; GPU/TPU use their own collectives.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if args.coordinator:
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
      raise ConfigError(f'--coordinator={args.coordinator} needs --num_processes >= 1 and '
                        f'0 <= --process_id < --num_processes (got {args.num_processes}, '
                        f'{args.process_id})')
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
  else:
    jax.distributed.initialize()
