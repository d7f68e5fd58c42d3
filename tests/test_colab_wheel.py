"""The Colab notebooks as Colab runs them: from a wheel, in a fresh virtual environment outside
the clone, executed from another directory. The notebooks' own install cell installs the wheel
(MOEJAX_REPO points it at the wheel built here), so that cell is what is tested."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

_EXECUTE = '''
import sys, nbformat
from nbclient import NotebookClient
for path in sys.argv[1:]:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name='python3').execute()
    nbformat.write(nb, path)
'''


@pytest.mark.slow  # builds a wheel and a venv: the integration step of .ci/run
def test_notebooks_run_from_a_wheel_in_a_fresh_venv(tmp_path):
  wheels = tmp_path / 'wheels'
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '-w', str(wheels),
                  str(ROOT)], check=True, capture_output=True, text=True)
  (wheel,) = wheels.glob('moejax-*.whl')
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
  py = str(venv / 'bin' / 'python')
  # What a Colab runtime already has: a Jupyter kernel.
  subprocess.run([py, '-m', 'pip', 'install', '-q', 'nbclient', 'nbformat', 'ipykernel'],
                 check=True, capture_output=True, text=True)
  work = tmp_path / 'colab'  # not the clone: configs must come from the installed package
  work.mkdir()
  names = ['quickstart', 'routing_comparison']
  for n in names:
    shutil.copy(ROOT / 'colab' / f'{n}.ipynb', work)
  env = {k: v for k, v in os.environ.items() if not k.startswith(('PYTHON', 'VIRTUAL_ENV'))}
  env.update(MOEJAX_REPO=str(wheel), MOEJAX_SMOKE='1', MOEJAX_WORKDIR=str(tmp_path / 'runs'),
             JAX_PLATFORMS='cpu', PATH=f"{venv / 'bin'}:{env.get('PATH', '')}",
             XLA_FLAGS='--xla_backend_optimization_level=0 '
                       '--xla_llvm_disable_expensive_passes=true')
  out = subprocess.run([py, '-c', _EXECUTE] + [str(work / f'{n}.ipynb') for n in names],
                       cwd=work, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-4000:]
  import nbformat
  for n in names:
    nb = nbformat.read(work / f'{n}.ipynb', as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
    assert not [o for o in outputs if o.output_type == 'error'], n
    text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
    assert 'running on CPU' in text, n
    assert len([o for o in outputs if 'image/png' in o.get('data', {})]) >= 2, n
  # The wheel (not a checkout) was imported, and it ships the configs and experiments.
  where = subprocess.run([py, '-c', 'import moejax, moejax.configs, moejax.experiments; '
                          'print(moejax.__file__)'], env=env, cwd=work, capture_output=True,
                         text=True, check=True).stdout
  assert str(venv) in where
