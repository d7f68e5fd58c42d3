"""Command-line arguments every command shares: argparse with one-line errors, `--config` with
`--config.x.y=v` overrides and `--print_config`, and `run`, which turns user errors into one
line and an exit code (2: a user error, 3: a diverged run)."""
from __future__ import annotations

import argparse
import ast
import sys

from moejax.cli.configs import load_config, named_configs
from moejax.config import field_parent
from moejax.errors import ConfigError, Diverged, Preempted

CONFIG_HELP = ('Every config field, its default and what it means: moejax/config.py '
               '(base_config). Override any of them with --config.SECTION.FIELD=VALUE, e.g. '
               '--config.train.steps=50; --print_config prints the resolved config and exits.')


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """Descriptions as written; a flag's help ends with its default when it has a meaningful one
  (not for required flags, switches, or an empty default)."""

  def _get_help_string(self, action):
    text = action.help or ''
    default = action.default
    if ('%(default)' in text or action.required or default is None or default == '' or
        isinstance(default, bool) or default is argparse.SUPPRESS or not action.option_strings):
      return text
    return text + ' (default: %(default)s)'


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors are one line (`error: ...`) with exit code 2, and whose help
  shows each flag's default."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault('formatter_class', HelpFormatter)
    super().__init__(*args, **kwargs)

  def error(self, message):
    raise ConfigError(f'{message} (see {self.prog} --help)')

  def parse_known_args(self, args=None, namespace=None):
    args = sys.argv[1:] if args is None else list(args)
    return super().parse_known_args([self._spelled(a) for a in args], namespace)

  def _spelled(self, arg: str) -> str:
    """--a_b and --a-b are one flag: the spelling this parser knows (flags are written with
    underscores; the other is accepted everywhere)."""
    if not isinstance(arg, str) or not arg.startswith('--') or arg.startswith('--config'):
      return arg
    name, eq, value = arg.partition('=')
    if name in self._option_string_actions:
      return arg
    for other in ('--' + name[2:].replace('-', '_'), '--' + name[2:].replace('_', '-')):
      if other in self._option_string_actions:
        return other + eq + value
    return arg


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
  """Call main_fn(argv); user errors -> one line on stderr and exit code 2, a diverged run -> 3,
  a preempted one (checkpointed, to resume with the same command) -> 4."""
  try:
    code = main_fn(argv)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except Diverged as e:
    print(f'error: {e}', file=sys.stderr)
    return 3
  except Preempted as e:
    print(str(e), file=sys.stderr)
    return 4
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    return 130
  return code or 0
