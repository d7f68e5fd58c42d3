"""README's commands are the ones CI runs, and every relative link of README, docs/ and
experiments/README.md resolves."""
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_readme_test_command():
  readme = (ROOT / 'README.md').read_text()
  ci = (ROOT / '.ci' / 'run').read_text()
  for line in ('pip install -e ".[dev,torch,data,kernels,tpu,eval,wandb]"', 'python -m pytest -n 2 --dist loadfile',
               'python -m pytest -n 2 --dist loadfile -m slow'):
    assert line in ci and line in readme
  assert ('pip install -e . && python -m moejax.main --config=configs/quickstart.py '
          '--workdir=runs/quickstart') in readme


def _links(path: pathlib.Path):
  """The relative link targets of a Markdown file (images included), without anchors."""
  import re
  for target in re.findall(r'\]\(([^)\s]+)\)', path.read_text()):
    if not target.startswith(('http://', 'https://', 'mailto:', '#')):
      yield target.split('#')[0]


def test_every_relative_link_in_the_docs_resolves():
  pages = [ROOT / 'README.md', ROOT / 'experiments' / 'README.md',
           *sorted((ROOT / 'docs').glob('*.md'))]
  assert len(pages) >= 8
  checked = 0
  for page in pages:
    for target in _links(page):
      assert (page.parent / target).exists(), f'{page.relative_to(ROOT)}: broken link {target}'
      checked += 1
  assert checked > 20


def test_the_link_check_finds_a_broken_link(tmp_path):
  page = tmp_path / 'page.md'
  page.write_text('see [a](missing.md), [b](https://example.com) and ![c](img.png#x)\n')
  (tmp_path / 'img.png').write_bytes(b'')
  assert list(_links(page)) == ['missing.md', 'img.png']
  assert not (page.parent / 'missing.md').exists()


def test_no_documented_folder_shadows_a_subpackage():
  """The folders the docs' commands write (--output, --workdir, prepared_dir) are not named like
  a moejax subpackage: in a clone named moejax, run from the folder above, such a folder at
  the clone's root would be imported in the subpackage's place."""
  import re
  subpackages = {p.name for p in (ROOT / 'moejax').iterdir() if (p / '__init__.py').exists()}
  assert {'data', 'model', 'moe'} <= subpackages
  pages = [ROOT / 'README.md', ROOT / 'experiments' / 'README.md',
           *sorted((ROOT / 'docs').glob('*.md'))]
  written = [m for page in pages for m in re.findall(
      r'--(?:output|workdir|config\.data\.prepared_dir|out)[= ]([\w./-]+)', page.read_text())]
  assert len(written) > 10
  for folder in written:
    top = folder.lstrip('./').split('/')[0]
    assert top not in subpackages, f'{folder}: shadows moejax.{top}'


def test_readme_lists_every_hugging_face_family_and_docs_every_refusal():
  """README's families table is the table in moejax/hf/families.py; docs/huggingface.md's
  table of every MoE model type is `python -m moejax.hf families` as it prints today."""
  import re
  from moejax.hf.__main__ import status_table
  from moejax.hf.convert import LANGUAGE_MODEL
  from moejax.hf.families import FAMILIES
  readme = (ROOT / 'README.md').read_text()
  section = readme.split('## Hugging Face families')[1].split('\n## ')[0]
  rows = re.findall(r'^\| (.+?) \|', section, re.M)[1:]  # past the header
  listed = {t for row in rows for t in re.findall(r'`(\w+)`', row)} - set(LANGUAGE_MODEL)
  assert listed == set(FAMILIES)
  docs = (ROOT / 'docs' / 'huggingface.md').read_text()
  assert docs.split('## Every MoE model type in transformers')[1].endswith('\n\n' + status_table())


def test_readme_lists_every_router():
  """README's router table has one row per registered router."""
  import re
  from moejax.moe.registry import ROUTERS
  readme = (ROOT / 'README.md').read_text()
  section = readme.split('## Routers')[1].split('\n## ')[0]
  rows = re.findall(r'^\| `(\w+)` \|', section, re.M)
  assert sorted(rows) == sorted(ROUTERS)


def test_the_notebooks_install_from_what_the_user_uploads(monkeypatch):
  """No notebook points at a repository that does not exist; with moejax not installed and
  nothing uploaded, the setup cell stops with one line saying what to upload."""
  import importlib.util
  import json
  import pytest
  monkeypatch.delenv('MOEJAX_REPO', raising=False)
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None)
  for path in sorted((ROOT / 'colab').glob('*.ipynb')):
    text = path.read_text()
    assert 'github.com' not in text, path.name
    cell = ''.join(json.loads(text)['cells'][1]['source'])
    if pathlib.Path('/content').exists():  # a Colab machine: what it holds decides
      continue
    with pytest.raises(SystemExit, match='upload moejax-.*whl .* or your clone as /content/moejax'):
      exec(compile(cell, path.name, 'exec'), {})
