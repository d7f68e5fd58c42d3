"""Every bad config is refused before anything compiles, naming the field and the fix."""
import pathlib

import pytest

from moejax.checks import validate
from moejax.config import ConfigError, base_config
from moejax.model.schedule import moe_layer_ids
from moejax.parallel.mesh import mesh_shape


def _err(c, devices=1):
  with pytest.raises(ConfigError) as e:
    validate(c, devices)
  return str(e.value)


def test_default_config_is_valid():
  assert validate(base_config(), 1) == {'data': 1, 'fsdp': 1, 'expert': 1, 'tensor': 1}


def test_topk_larger_than_experts():
  c = base_config()
  c.model.moe.num_experts, c.model.moe.num_experts_per_tok = 4, 5
  msg = _err(c)
  assert 'model.moe.num_experts_per_tok=5' in msg and 'at most 4' in msg


@pytest.mark.parametrize('field', ['model.d_model', 'model.num_layers', 'model.moe.num_experts',
                                   'model.moe.expert_ffn_dim', 'train.batch_size',
                                   'data.seq_len', 'model.num_heads'])
@pytest.mark.parametrize('value', [0, -3])
def test_non_positive_sizes(field, value):
  c = base_config()
  section, key = field.rsplit('.', 1)
  node = c
  for part in section.split('.'):
    node = node[part]
  node[key] = value
  msg = _err(c)
  assert f'config.{field}={value}' in msg and 'positive' in msg


def test_mesh_product_differs_from_devices():
  c = base_config()
  c.mesh.data, c.mesh.expert = 2, 2
  msg = _err(c, devices=8)
  assert 'multiply to 4' in msg and '8 devices' in msg


def test_mesh_free_axis_resolves():
  c = base_config()
  c.mesh.expert = 4
  assert mesh_shape(c.mesh, 8) == {'data': 2, 'fsdp': 1, 'expert': 4, 'tensor': 1}


def test_mesh_must_divide_experts():
  c = base_config()
  c.model.moe.num_experts = 6
  c.mesh.data, c.mesh.expert = 2, 4
  msg = _err(c, devices=8)
  assert 'mesh.expert=4' in msg and 'num_experts=6' in msg


def test_mesh_must_divide_heads():
  c = base_config()
  c.model.num_heads, c.model.num_kv_heads = 6, 3
  c.mesh.data, c.mesh.tensor = 2, 4
  msg = _err(c, devices=8)
  assert 'mesh.tensor=4' in msg and 'num_heads=6' in msg


@pytest.mark.parametrize('field,value', [('model.moe.router.name', 'nonsense'),
                                         ('model.moe.dispatch.name', 'teleport'),
                                         ('model.moe.experts.backend', 'magic')])
def test_unknown_names(field, value):
  c = base_config()
  section, key = field.rsplit('.', 1)
  node = c
  for part in section.split('.'):
    node = node[part]
  node[key] = value
  msg = _err(c)
  assert f'config.{field}={value!r}' in msg and 'must be one of' in msg


def test_missing_data_path(tmp_path):
  c = base_config()
  c.data.source, c.data.paths = 'files', str(tmp_path / 'nope.txt')
  msg = _err(c)
  assert 'config.data.paths' in msg and 'does not exist' in msg


def test_seq_len_beyond_rope_table():
  c = base_config()
  c.data.seq_len, c.model.max_seq_len = 2048, 1024
  msg = _err(c)
  assert 'data.seq_len=2048' in msg and 'max_seq_len=1024' in msg


def test_batch_must_split_over_mesh():
  c = base_config()
  c.train.batch_size = 12
  msg = _err(c, devices=8)
  assert 'train.batch_size=12' in msg


def test_moe_layer_schedule():
  c = base_config()
  c.model.num_layers, c.model.first_k_dense, c.model.moe_layer_freq = 7, 2, 2
  assert moe_layer_ids(c.model) == [2, 4, 6]


def test_quickstart_parameter_counts():
  """The figures README quotes, from the real model definition."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      'quickstart', pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'quickstart.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  from moejax.costs.parameters import count_params
  counts = count_params(mod.get_config().model)
  assert (counts['total'], counts['routed_experts'], counts['active']) == (1670784, 1179648,
                                                                           786048)
  # Hand count of the routed experts: 3 MoE layers x 16 experts x 3 matrices of 128 x 64.
  assert counts['routed_experts'] == 3 * 16 * 3 * 128 * 64


def test_a_mesh_that_does_not_fit_blames_the_axes_that_were_set():
  c = base_config()
  c.mesh.expert = 3
  with pytest.raises(ConfigError, match=r'^config.mesh.expert=3: does not divide the 8 devices '
                     r'\(mesh.data=-1 takes the rest\); pick a divisor of 8$'):
    mesh_shape(c.mesh, 8)
  c.mesh.tensor = 2
  with pytest.raises(ConfigError, match=r"^config.mesh=\{'expert': 3, 'tensor': 2\}: these axes "
                     r'multiply to 6, which does not divide the 8 devices'):
    mesh_shape(c.mesh, 8)



class _Host:
  """A device as jax.experimental.mesh_utils reads it: an id, its process, its platform."""

  def __init__(self, i, process):
    self.id, self.process_index, self.platform, self.device_kind = i, process, 'cpu', 'cpu'

  def __repr__(self):
    return f'd{self.id}@p{self.process_index}'


def test_dcn_axes_lay_each_process_along_them_and_are_checked():
  """mesh.dcn_data=2 over two processes whose devices come interleaved (as a launcher may
  number them): each process's devices form one index of the data axis (the plain order would
  mix them), and the fsdp axis likewise under dcn_fsdp; wrong counts name the field."""
  from moejax.parallel.mesh import dcn_shape, device_grid
  devices = [_Host(i, i % 2) for i in range(8)]
  c = base_config()
  c.mesh.data, c.mesh.expert = 2, 4
  sizes = mesh_shape(c.mesh, 8)
  assert dcn_shape(c.mesh, sizes, devices) == {'data': 1, 'fsdp': 1, 'expert': 1, 'tensor': 1}
  plain = device_grid(sizes, dcn_shape(c.mesh, sizes, devices), devices)
  assert {d.process_index for d in plain[0].flat} == {0, 1}
  c.mesh.dcn_data = 2
  grid = device_grid(sizes, dcn_shape(c.mesh, sizes, devices), devices)
  assert grid.shape == (2, 1, 4, 1)
  assert [{d.process_index for d in grid[i].flat} for i in range(2)] == [{0}, {1}]
  c.mesh.data, c.mesh.fsdp, c.mesh.dcn_data, c.mesh.dcn_fsdp = 1, 2, 1, 2
  sizes = mesh_shape(c.mesh, 8)
  grid = device_grid(sizes, dcn_shape(c.mesh, sizes, devices), devices)
  assert [{d.process_index for d in grid[:, i].flat} for i in range(2)] == [{0}, {1}]
  for mesh, match in (
      (dict(data=8, dcn_data=4), r'^config.mesh.dcn_data=4: the dcn axes span 4 processes but '
       r'the devices are 2 processes; make their product 2$'),
      (dict(data=2, fsdp=4, dcn_data=1, dcn_fsdp=0), r'^config.mesh.dcn_fsdp=0: must be at least 1'),
      (dict(data=1, fsdp=8, dcn_data=2), r'^config.mesh.dcn_data=2: must divide mesh.data=1 ')):
    c = base_config()
    for k, v in mesh.items():
      c.mesh[k] = v
    with pytest.raises(ConfigError, match=match):
      dcn_shape(c.mesh, mesh_shape(c.mesh, 8), devices)
  one = [_Host(i, 0) for i in range(8)]
  c = base_config()
  c.mesh.dcn_data = 2
  with pytest.raises(ConfigError, match=r'span 2 processes but the devices are 1 process;'):
    dcn_shape(c.mesh, mesh_shape(c.mesh, 8), one)


def test_wandb_fields_are_checked_before_anything_runs(monkeypatch):
  def refused(fields, text):
    c = base_config()
    for k, v in fields.items():
      c.train[k] = v
    with pytest.raises(ConfigError, match=text):
      validate(c, 1)
  refused({'wandb_mode': 'ofline'}, r"train.wandb_mode='ofline': must be one of \['', 'online', "
          r"'offline'\]")
  refused({'wandb_name': 'run-1'}, r"train.wandb_name='run-1': set train.wandb_project too")
  refused({'wandb_group': 'g'}, r"train.wandb_group='g': set train.wandb_project too")
  monkeypatch.setitem(__import__('sys').modules, 'wandb', None)  # not installed
  refused({'wandb_project': 'p'}, r"wandb is not installed: pip install 'moejax\[wandb\]'")
  c = base_config()
  c.train.wandb_mode = 'offline'  # a mode alone is no W&B run: valid without wandb installed
  validate(c, 1)
