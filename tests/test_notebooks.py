"""Every Colab notebook runs top to bottom (at smoke size, on the CPU) so none can rot."""
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

COLAB = pathlib.Path(__file__).resolve().parents[1] / 'colab'


@pytest.mark.parametrize('name', ['quickstart', 'routing_comparison'])
def test_notebook_runs(name, tmp_path, monkeypatch):
  monkeypatch.setenv('MOEJAX_SMOKE', '1')  # the kernel inherits the environment
  monkeypatch.setenv('MOEJAX_WORKDIR', str(tmp_path))
  # One CPU device and XLA's cheapest optimisation (compile time dominates a smoke run).
  monkeypatch.setenv('XLA_FLAGS', '--xla_backend_optimization_level=0 '
                     '--xla_llvm_disable_expensive_passes=true')
  nb = nbformat.read(COLAB / f'{name}.ipynb', as_version=4)
  NotebookClient(nb, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': str(COLAB)}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  assert 'running on CPU' in text  # says which backend it used
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) >= 2
