"""python -m moejax.compile: tiny configs compiled by XLA's TPU compiler for a 4-chip v5e slice
(compile-only devices; libtpu from the `tpu` extra), the collectives of every dispatch path, the
memory against the planner, out-of-memory as the pod would report it; and, without libtpu, the
HLO reader on hand-written modules, the topology names and the 'auto' dispatch on CPU devices."""
import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.compile import chips, hlo
from moejax.compile.__main__ import main
from moejax.errors import ConfigError

from conftest import tiny_config, train_side_by_side, trainer_on

LIBTPU = pytest.mark.skipif(not chips.libtpu_installed(), reason='libtpu is not installed (pip '
                            'install "moejax[tpu]"); the TPU compiles cannot run')


# ---- topology names (no libtpu needed) ----

@pytest.mark.parametrize('name,chips_,shape', [
    ('v5p-8', 4, (2, 2, 1)), ('v5p-16', 8, (2, 2, 2)), ('v5p-32', 16, (2, 2, 4)),
    ('v5p-128', 64, (4, 4, 4)), ('v5p-256', 128, (4, 4, 8)), ('v4-32', 16, (2, 2, 4)),
    ('v5e-1', 1, (1, 1)), ('v5e-8', 8, (2, 4)), ('v5e-16', 16, (4, 4)), ('v6e-32', 32, (4, 8)),
    ('v6e-256', 256, (16, 16)), ('v5litepod-4', 4, (2, 2))])
def test_topology_names_are_the_booked_ones(name, chips_, shape):
  """v4/v5p count TensorCores (2 per chip), v5e/v6e chips; shapes as Cloud TPU lists them."""
  t = chips.parse_topology(name)
  assert (t.chips, t.shape) == (chips_, shape)
  assert t.libtpu_name == f"{t.chip.topology_prefix}:{'x'.join(map(str, shape))}"


@pytest.mark.parametrize('name,match', [
    ('v5p', 'GENERATION-N'), ('v7x-8', "unknown TPU generation 'v7x'"),
    ('v5p-6', 'counts TensorCores, 2 per chip; N must be a power of two from 8'),
    ('v5p-4', 'from 8'), ('v5e-3', 'counts chips'), ('v5e-512', 'to 256'),
    ('v6e-0', 'power of two')])
def test_bad_topology_names_are_one_line(name, match):
  with pytest.raises(ConfigError, match=match):
    chips.parse_topology(name)


def test_oom_message_is_read():
  msg = ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
         'temporaries (745.21G) exceeds available HBM (95.74G).')
  oom = chips.parse_oom(msg)
  assert oom['required_bytes'] == pytest.approx(745.21 * 2**30)
  assert oom['available_bytes'] == pytest.approx(95.74 * 2**30)
  used = chips.parse_oom('RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory '
                         'in memory space hbm. Used 120.50G of 95.74G hbm. Exceeded hbm capacity '
                         'by 24.76G.')
  assert used['required_bytes'] == pytest.approx(120.5 * 2**30)
  assert chips.parse_oom('INVALID_ARGUMENT: shapes differ') is None


# ---- the HLO reader on hand-written modules (no libtpu needed) ----

MODULE = """HloModule m, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%cond (p: (s32[], bf16[4,6])) -> pred[] {
  %p = (s32[], bf16[4,6]) parameter(0)
  %c = s32[]{:T(128)} constant(3)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (p: (s32[], bf16[4,6])) -> (s32[], bf16[4,6]) {
  %p = (s32[], bf16[4,6]) parameter(0)
  %x = bf16[4,6]{1,0} get-tuple-element(%p), index=1
  %ag = bf16[8,6]{1,0:T(8,128)} all-gather(%x), channel_id=1, replica_groups={{0,1},{2,3}}, dimensions={0}, use_global_device_ids=true, metadata={op_name="jit(f)/while/body/experts/all_gather"}
  %rs = bf16[4,6]{1,0} reduce-scatter(%ag), channel_id=2, replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}, to_apply=%add
  ROOT %t = (s32[], bf16[4,6]) tuple(%i, %rs)
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %w = (s32[], bf16[4,6]) while(%init), condition=%cond, body=%body
  %ar = (f32[8]{0}, f32[2,3]{1,0}) all-reduce(%x, %y), channel_id=3, replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0','axis_1'}, to_apply=%add
  %a2a = f32[8]{0} all-to-all(%x), channel_id=4, replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}, dimensions={0}
  %ag2 = f32[4,8]{1,0} all-gather(%x), channel_id=6, replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=([2,2]T(1,0)) {'axis_1'}, dimensions={0}
  %cp = f32[8]{0} collective-permute(%x), channel_id=5, source_target_pairs={{0,1},{1,0},{2,3},{3,2}}
  ROOT %r = f32[8]{0} add(%x, %x)
}
"""
MESH = {'data': 2, 'fsdp': 1, 'expert': 2, 'tensor': 1}  # device i = (data i // 2, expert i % 2)


def test_hlo_reader_kinds_bytes_axes_and_loop_counts():
  """Groups {0,1},{2,3} vary the inner (expert) axis; [2,2]<=[2,2]T(1,0) is {0,2},{1,3}, the
  data axis; the mesh form over axis_0 (the outer) is data as well. The loop runs 3 times."""
  found = {c.kind: c for c in hlo.collectives(MODULE, MESH) if c.shape != 'f32[4,8]'}
  ag, rs = found['all-gather'], found['reduce-scatter']
  assert (ag.bytes, ag.shape, ag.axes, ag.group_size, ag.runs, ag.trips_known) == (
      8 * 6 * 2, 'bf16[8,6]', ('expert',), 2, 3, True)
  assert 'experts' in ag.source
  assert (rs.bytes, rs.axes, rs.runs) == (4 * 6 * 2, ('data',), 3)
  ar = found['all-reduce']
  assert (ar.bytes, ar.axes, ar.group_size, ar.runs) == (8 * 4 + 6 * 4, ('data', 'expert'), 4, 1)
  assert found['all-to-all'].axes == ('data',)
  assert found['collective-permute'].axes == ('expert',)
  # device_ids=([2,2]T(1,0)) lists the mesh's devices as 0, 2, 1, 3: its inner axis_1 then
  # groups {0,2} and {1,3}, the data axis.
  ag2 = [c for c in hlo.collectives(MODULE, MESH) if c.shape == 'f32[4,8]']
  assert [c.axes for c in ag2] == [('data',)]
  s = hlo.summary(list(found.values()))
  assert s['all-gather'] == {'ops': 1, 'runs': 3, 'bytes': 3 * 96, 'by_axes': {'expert': 288}}


def test_axes_of_refuses_groups_that_are_no_axis():
  assert hlo.axes_of(np.array([[0, 3], [1, 2]]), MESH) == ('?',)
  assert hlo.axes_of(np.arange(4)[None], MESH) == ('data', 'expert')
  assert hlo.axes_of(np.arange(4)[:, None], MESH) == ('none',)


# ---- 'auto' dispatch on CPU devices (no libtpu needed) ----

def test_auto_dispatch_is_the_ring_on_an_expert_axis_and_equals_one_device():
  """On 8 CPU devices with expert=4, 'auto' runs the ring (its all-gather and reduce-scatter in
  the compiled step) and trains like one device; on one device it is plain dropless."""
  c = tiny_config(num_shared_experts=0)
  c.model.moe.dispatch.name = 'auto'
  one = trainer_on(copy.deepcopy(c), dict(data=1, fsdp=1, expert=1, tensor=1))
  eight = trainer_on(copy.deepcopy(c), dict(data=2, fsdp=1, expert=4, tensor=1))
  train_side_by_side(one, eight, ['train/loss', 'train/grad_norm'], steps=2, rtol=2e-5, atol=2e-6)
  batch = {k: jax.ShapeDtypeStruct((8, 16), jnp.int32, sharding=eight.batch_sharding)
           for k in ('inputs', 'targets')}
  with eight.context():
    text = eight._train_step.lower(eight.abstract_state, batch).as_text()
  assert 'psum_scatter' in text or 'reduce_scatter' in text


# ---- TPU compiles (libtpu) ----

def _tpu_config(dispatch: str, **mesh):
  c = tiny_config(num_shared_experts=0)
  c.model.num_layers, c.model.dtype = 2, 'bfloat16'  # one dense layer, one MoE layer
  c.model.moe.dispatch.name = dispatch
  if dispatch in ('capacity', 'einsum', 'all_to_all'):
    c.model.moe.dispatch.capacity_factor = 2.0
  if dispatch == 'einsum':
    c.model.moe.dispatch.group_size = 16
  for axis, size in {'data': 1, 'fsdp': 1, 'expert': 4, 'tensor': 1, **mesh}.items():
    c.mesh[axis] = size
  return c


def _expert_weight_gathers(found, c):
  """All-gathers whose result is a whole routed-expert weight ([..., N, d, f] or [..., N, f, d]:
  a stacked layer axis may lead)."""
  n, d, f = c.model.moe.num_experts, c.model.d_model, c.model.moe.expert_ffn_dim
  whole = {(n, d, f), (n, f, d)}
  dims = lambda shape: tuple(int(x) for x in shape[shape.index('[') + 1:-1].split(','))[-3:]  # noqa: E731
  return [x for x in found if x.kind == 'all-gather' and dims(x.shape) in whole]


@pytest.fixture(scope='module')
def v5e4():
  return chips.parse_topology('v5e-4')


# dispatch -> (a collective that moves tokens, present), and whether the experts' weights are
# gathered whole over the expert axis (only plain dropless, GSPMD's way).
PATHS = {'auto': ('ragged-all-to-all', False), 'ragged_all_to_all': ('ragged-all-to-all', False),
         'ring': ('reduce-scatter', False), 'all_to_all': ('all-to-all', False),
         'dropless': (None, True)}


@LIBTPU
@pytest.mark.parametrize('dispatch', sorted(PATHS))
def test_dispatch_paths_move_tokens_not_experts_on_tpu(v5e4, dispatch):
  from moejax.compile import program
  c = _tpu_config(dispatch)
  t, (compiled,) = program.compile_config(c, v5e4, ('train',))
  assert compiled.fits
  moves, gathers = PATHS[dispatch]
  kinds = {x.kind for x in compiled.collectives if 'expert' in x.axes}
  if moves:
    assert moves in kinds, (dispatch, kinds)
  assert bool(_expert_weight_gathers(compiled.collectives, c)) == gathers, dispatch
  if dispatch in ('auto', 'ragged_all_to_all'):  # the ragged exchange inside the MoE layer
    ragged = [x for x in compiled.collectives if x.kind == 'ragged-all-to-all']
    assert all(x.axes == ('expert',) and 'moe' in x.source for x in ragged)


@LIBTPU
def test_memory_by_kind_matches_the_compiler_and_the_planner(v5e4):
  """Widths in whole TPU tiles (multiples of 128), so the compiler pads little: its argument
  bytes are the state (from the shardings) and the batch, and the planner's count is within
  15% of them (the padding of the stacked norm scales is the gap); the total fits."""
  from moejax.compile import program, report
  from moejax.costs.planner import train_state_bytes_per_device
  c = _tpu_config('auto', fsdp=2, expert=2)
  m = c.model
  m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.ffn_dim = 256, 2, 2, 128, 512
  m.vocab_size, m.moe.expert_ffn_dim = 512, 256
  t, (compiled,) = program.compile_config(c, v5e4, ('train',))
  mem = compiled.memory
  state = mem['parameters'] + mem['optimizer_state'] + mem['model_state']
  batch = 2 * c.train.batch_size * c.data.seq_len * 4 // 4  # inputs and targets over 4 chips
  assert state + batch <= mem['arguments'] <= 1.1 * (state + batch), (mem, state, batch)
  planned = train_state_bytes_per_device(c.model, t.sizes)
  assert abs(planned - (mem['parameters'] + mem['optimizer_state'])) <= 0.01 * planned
  hbm = chips.usable_hbm(v5e4)
  assert 15 * 2**30 < hbm < 16 * 2**30  # v5e: 16 GB, 15.75 GiB usable
  r = report.program_report(c, t, compiled, hbm)
  assert r['fits'] and 0.85 <= r['planner']['ratio'] <= 1.15, r['planner']
  roof = r['roofline']
  assert roof['step_s'] == max(roof['compute_s'], roof['hbm_s'], roof['ici_s'] + roof['dcn_s'])
  assert roof['compute_s'] == pytest.approx(r['model_flops_per_chip'] / 197e12)


@LIBTPU
def test_command_reports_out_of_memory_without_a_traceback(v5e4, tmp_path, capsys):
  """A vocabulary of 2^22 x d 1024 in float32, replicated on one chip: 16 GiB of parameters
  alone. The command says it does not fit and by how much (exit 0), JSON and Markdown."""
  code = main(['--config=quickstart', '--topology=v5e-1', '--config.model.vocab_size=4194304',
               '--config.model.d_model=1024', '--config.model.head_dim=256',
               '--config.data.vocab_multiple=1', f'--out={tmp_path}', '--json'])
  out = capsys.readouterr()
  assert code == 0, out.err
  report = json.loads(out.out)
  p = report['programs'][0]
  assert p['fits'] is False and p['over_by_gib'] > 0 and p['required_gib'] > 15.75
  assert (tmp_path / 'compile.json').exists()
  assert 'Does not fit' in (tmp_path / 'compile.md').read_text()


@LIBTPU
def test_command_errors_are_one_line(capsys):
  assert main(['--config=quickstart', '--topology=v5p-6']) == 2
  err = capsys.readouterr().err.strip()
  assert err.count('\n') == 0 and '--topology=' in err
  assert main(['--config=quickstart', '--topology=v5e-4', '--config.mesh.expert=3']) == 2
  err = capsys.readouterr().err.strip()
  assert 'mesh.expert' in err and err.count('\n') == 0
  assert main(['--config=quickstart', '--topology=v5e-4', '--programs=train,sample']) == 2
  assert '--programs' in capsys.readouterr().err


def test_without_libtpu_the_command_says_how_to_install(monkeypatch, capsys):
  monkeypatch.setattr(chips, 'libtpu_installed', lambda: False)
  assert main(['--config=quickstart', '--topology=v5e-4']) == 2
  err = capsys.readouterr().err.strip()
  assert err.count('\n') == 0 and 'pip install "moejax[tpu]"' in err
