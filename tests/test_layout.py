"""The house: no import circles (every import, lazy ones included, read with ast), only commands
and config/checks/errors at the top of the package, every package in the wheel, and the shipped
configs and experiments import their shared code as packages."""
import ast
import pathlib
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'moejax'
# The modules allowed at the top of the package: the commands (python -m moejax.X) and the
# three every room may read.
TOP = {'__init__', 'config', 'checks', 'errors', 'main', 'generate', 'params', 'upcycle'}


def _modules(root=ROOT) -> dict:
  """{dotted module name: file} of the package under root."""
  out = {}
  for path in (root / 'moejax').rglob('*.py'):
    name = '.'.join(path.relative_to(root).with_suffix('').parts)
    out[name.removesuffix('.__init__')] = path
  return out


def import_graph(modules: dict) -> dict:
  """module -> the package modules it imports (anywhere in the file)."""
  graph = {m: set() for m in modules}
  for mod, path in modules.items():
    package = mod if path.name == '__init__.py' else mod.rpartition('.')[0]
    for node in ast.walk(ast.parse(path.read_text())):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
          parts = package.split('.')[:len(package.split('.')) - node.level + 1]
          base = '.'.join(parts + ([base] if base else []))
        targets = [base] + [f'{base}.{a.name}' for a in node.names]
      for t in targets:
        while t and t not in modules:
          t = t.rpartition('.')[0]
        if t and t != mod and not t.startswith(mod + '.'):
          graph[mod].add(t)
  return graph


def find_cycle(graph: dict):
  """One import circle as a list of modules (first == last), or None."""
  colour, stack = {}, []

  def visit(u):
    colour[u] = 1
    stack.append(u)
    for v in sorted(graph[u]):
      if colour.get(v) == 1:
        return stack[stack.index(v):] + [v]
      if v not in colour:
        found = visit(v)
        if found:
          return found
    stack.pop()
    colour[u] = 2
    return None

  for m in sorted(graph):
    if m not in colour:
      found = visit(m)
      if found:
        return found
  return None


def test_no_import_circles():
  cycle = find_cycle(import_graph(_modules()))
  assert cycle is None, 'import circle: ' + ' -> '.join(cycle)


def test_the_cycle_finder_finds_one():
  """The check can fail: a planted circle is found and named."""
  graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}
  assert find_cycle(graph) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_lazy_and_relative_imports_are_edges(tmp_path):
  pkg = tmp_path / 'moejax'
  (pkg / 'sub').mkdir(parents=True)
  (pkg / '__init__.py').write_text('')
  (pkg / 'sub' / '__init__.py').write_text('')
  (pkg / 'sub' / 'x.py').write_text('def f():\n  from moejax.sub import y\n')
  (pkg / 'sub' / 'y.py').write_text('from . import x\n')
  assert find_cycle(import_graph(_modules(tmp_path))) in (
      ['moejax.sub.x', 'moejax.sub.y', 'moejax.sub.x'],
      ['moejax.sub.y', 'moejax.sub.x', 'moejax.sub.y'])


def test_only_commands_and_config_at_the_top():
  loose = {p.stem for p in PACKAGE.glob('*.py')} - TOP
  assert not loose, f'modules loose at the top of moejax/: {sorted(loose)}; give them a room'


def test_every_package_is_in_the_wheel():
  listed = set(tomllib.loads((ROOT / 'pyproject.toml').read_text())['tool']['setuptools'][
      'packages'])
  found = {'.'.join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob('__init__.py')}
  assert found <= listed, f'packages missing from pyproject.toml: {sorted(found - listed)}'


@pytest.mark.parametrize('folder', ['configs', 'experiments'])
def test_shipped_files_import_siblings_as_packages(folder):
  for path in (ROOT / folder).glob('*.py'):
    text = path.read_text()
    assert 'sys.path' not in text, path
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, ast.ImportFrom) and node.module and not node.level:
        sibling = (ROOT / folder / f'{node.module}.py').exists()
        assert not sibling, f'{path.name} imports {node.module!r} by path; use moejax.{folder}'


def test_a_test_session_leaves_no_cache_folder_behind(tmp_path):
  """tests/conftest.py's compilation cache is removed when the session's processes exit."""
  import os
  import subprocess
  import sys
  env = {**os.environ, 'TMPDIR': str(tmp_path)}
  subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                  '--basetemp', str(tmp_path / 'base'),
                  'tests/test_layout.py::test_the_cycle_finder_finds_one'],
                 cwd=ROOT, env=env, check=True, capture_output=True)
  assert not [p for p in os.listdir(tmp_path) if p.startswith('moejax-jit-cache-')]
