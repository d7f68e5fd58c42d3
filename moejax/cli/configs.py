"""Config and experiment files by path or by name.

A config is a Python file whose `get_config()` (or `get_config(arg)` for `path.py:arg`) returns
the ml_collections ConfigDict of `moejax.config.base_config()` with some fields changed. It is
named by path (`configs/quickstart.py`, `my/exp.py:tiny`) or, for the configs that ship with
moejax (installed as the package `moejax.configs`, so a wheel without a checkout has them), by
name (`quickstart`, `deepseek_v3:tiny`). Shipped files import their shared code as packages
(`moejax.configs.published`, `moejax.experiments.common`).
"""
from __future__ import annotations

import difflib
import importlib.resources
import importlib.util
import inspect
import os
import sys

import ml_collections

from moejax.errors import ConfigError


def shipped_names(package: str, skip=()) -> list[str]:
  """The modules a package of moejax ships (its configs, its experiments), by name."""
  return sorted(f.name[:-3] for f in importlib.resources.files(package).iterdir()
                if f.name.endswith('.py') and f.name not in ('__init__.py', *skip))


def shipped_path(spec: str, package: str, what: str, skip=()) -> str:
  """A file path as it is, or the name of a module `package` ships -> its file."""
  if os.path.isfile(spec):
    return spec
  names = shipped_names(package, skip)
  name = os.path.basename(spec)[:-3] if spec.endswith('.py') else spec
  if os.sep not in spec and not spec.endswith('.py'):
    shipped = importlib.resources.files(package) / f'{spec}.py'
    if shipped.is_file():
      return str(shipped)
  close = difflib.get_close_matches(name, names, n=1)
  if name in names:  # 'quickstart.py' from another folder: the name works
    hint = f'the shipped one is named {name!r} (without .py)'
  elif close:
    hint = f'did you mean {close[0]!r}?'
  else:
    hint = f'give a path or one of {names}'
  raise ConfigError(f'{what}={spec}: no such file, and no shipped {what.lstrip("-")} of that '
                    f'name; {hint}')


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
  if arg and not inspect.signature(module.get_config).parameters:
    raise ConfigError(f'--config={spec}: {os.path.basename(path)} takes no argument (its '
                      f"get_config() has no parameter); drop ':{arg}'")
  try:
    return module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # noqa: BLE001
    raise ConfigError(f'--config={spec}: get_config failed: {_one_line(e)}') from e


def _one_line(e: BaseException) -> str:
  where = ''
  if isinstance(e, SyntaxError):
    where = f' (line {e.lineno})'
  return f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}{where}'
