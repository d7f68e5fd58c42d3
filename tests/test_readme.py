"""README's two commands are the ones CI runs, and the quickstart config is what README says."""
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_readme_test_command():
  readme = (ROOT / 'README.md').read_text()
  ci = (ROOT / '.ci' / 'run').read_text()
  for line in ('pip install -e ".[dev,torch,data]"', 'python -m pytest -n 2 --dist loadfile',
               'python -m pytest -n 2 --dist loadfile -m slow'):
    assert line in ci and line in readme
  assert ('pip install -e . && python -m moejax.main --config=configs/quickstart.py '
          '--workdir=runs/quickstart') in readme


def test_every_package_is_installed():
  """pyproject lists packages explicitly: a new folder of moejax must be in the list, or the
  wheel (Colab) lacks it while an editable install hides the gap."""
  import tomllib
  listed = set(tomllib.loads((ROOT / 'pyproject.toml').read_text())['tool']['setuptools']
               ['packages'])
  found = {'.'.join(p.parent.relative_to(ROOT).parts)
           for p in (ROOT / 'moejax').rglob('__init__.py')}
  assert found <= listed, sorted(found - listed)
