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
  assert used['memory'] == 'hbm'
  vmem = chips.parse_oom('RESOURCE_EXHAUSTED: E1001: CompileTimeScopedVmemOom:')
  assert vmem['memory'] == 'vmem' and 'required_bytes' not in vmem


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
  %snd = (bf16[3,8]{1,0}, u32[], token[]) send(%x, %tok), channel_id=7, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_target="{1,2}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}
  %rcv = (bf16[3,8]{1,0}, u32[], token[]) recv(%tok), channel_id=8, is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
  %cp = f32[8]{0} collective-permute(%x), channel_id=5, source_target_pairs={{0,1},{1,0},{2,3},{3,2}}
  %rows = f32[6,8]{1,0} broadcast(%x), dimensions={1}
  %raa = f32[24,8]{1,0} ragged-all-to-all(%rows, %buf, %io, %ss, %oo, %rs), channel_id=9, replica_groups={{0,1},{2,3}}
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
  # Ragged all-to-all sends at most its operand (6 rows here), not its worst-case receive
  # buffer (24 rows).
  raa = found['ragged-all-to-all']
  assert (raa.bytes, raa.axes, raa.group_size) == (6 * 8 * 4, ('expert',), 2)
  assert not [c for c in hlo.collectives(MODULE, MESH) if c.axes == ('dcn',)]  # one slice
  dcn = [c for c in hlo.collectives(MODULE, MESH, slices=2) if c.axes == ('dcn',)]
  assert [(c.kind, c.bytes, c.group_size) for c in dcn] == [('all-reduce', 3 * 8 * 2, 2)]
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
  text = eight.lower_train_step(eight.abstract_state, batch).as_text()
  assert 'psum_scatter' in text or 'reduce_scatter' in text
  from moejax.moe.dispatch.auto import chosen_path
  with one.context():  # no expert axis: plain dropless, no shard_map around the experts
    assert chosen_path() == 'dropless'
  with eight.context():
    assert chosen_path() == 'ring'


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


# dispatch -> the collective that carries its tokens to the experts over the expert axis
# (plain dropless has none: GSPMD partitions its expert matmuls its own way).
PATHS = {'auto': 'ragged-all-to-all', 'ragged_all_to_all': 'ragged-all-to-all',
         'ring': 'reduce-scatter', 'all_to_all': 'all-to-all', 'dropless': None}
_COMPILED = {}


def _compiled(dispatch: str):
  """The train step of _tpu_config(dispatch) compiled for v5e-4 (once per test process)."""
  if dispatch not in _COMPILED:
    from moejax.compile import program
    c = _tpu_config(dispatch)
    _COMPILED[dispatch] = (c, program.compile_config(c, chips.parse_topology('v5e-4'),
                                                     ('train',))[1][0])
  return _COMPILED[dispatch]


@LIBTPU
@pytest.mark.parametrize('dispatch', [
    pytest.param(d, marks=pytest.mark.slow) if d == 'ragged_all_to_all' else d
    for d in sorted(PATHS)])  # on TPU, auto is ragged_all_to_all: one of them by default
def test_dispatch_paths_move_tokens_not_experts_on_tpu(dispatch):
  """The expert-parallel paths carry tokens over the expert axis with their own collective and
  never gather a whole expert weight; 'auto' is the ragged exchange, inside the MoE layer.
  Plain dropless leaves it to GSPMD, which gathers every expert's weights over the expert axis
  and hands every chip every (token, choice) row of the whole batch: an all-reduce of [T K, d]
  over the expert axis inside the experts."""
  c, compiled = _compiled(dispatch)
  assert compiled.fits
  kinds = {x.kind for x in compiled.collectives if 'expert' in x.axes}
  gathers = _expert_weight_gathers(compiled.collectives, c)
  assert bool(gathers) == (PATHS[dispatch] is None), dispatch
  assert all(x.axes == ('expert',) for x in gathers)
  if PATHS[dispatch]:
    assert PATHS[dispatch] in kinds, (dispatch, kinds)
  else:
    t, k, d = 8 * 16, 2, c.model.d_model  # batch x seq tokens, top-2, width
    everything = [x for x in compiled.collectives if x.kind == 'all-reduce' and
                  'experts.dropless' in x.source and x.shape == f'bf16[{t * k},{d}]']
    assert everything and all('expert' in x.axes for x in everything)
    assert 'ragged-all-to-all' not in kinds
  if dispatch in ('auto', 'ragged_all_to_all'):
    ragged = [x for x in compiled.collectives if x.kind == 'ragged-all-to-all']
    assert ragged and all(x.axes == ('expert',) and 'moe' in x.source for x in ragged)


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
  assert roof['compute_s'] == pytest.approx(r['model_flops_per_chip'] / 197e12)  # no remat
  assert roof['mfu'] == pytest.approx(roof['compute_s'] / roof['step_s'], abs=1e-4)


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


def test_roofline_by_hand():
  """One chip kind (v5e: 197 TFLOP/s, 819 GB/s HBM, 400 GB/s ICI), a step with 1e12 bytes
  accessed, an all-gather of 8e9 bytes over 4 chips run twice and an all-reduce of 1e9 bytes
  over 2 chips crossing slices (DCN 3.125 GB/s): every term worked out here."""
  from moejax.compile import program, report
  from moejax.costs.flops import flops_per_token
  c = tiny_config()
  c.model.remat = 'full'
  topo = chips.parse_topology('v5e-4', slices=2)
  t = program.Target(topo, None, {'data': 2, 'fsdp': 1, 'expert': 4, 'tensor': 1},
                     {'data': 2, 'fsdp': 1, 'expert': 1, 'tensor': 1})
  found = [hlo.Collective('all-gather', int(8e9), ('expert',), 4, 2, True, 'x', 'bf16[1]'),
           hlo.Collective('all-reduce', int(1e9), ('dcn',), 2, 1, True, 'y', 'f32[1]')]
  mem = {'parameters': 1, 'optimizer_state': 2, 'model_state': 0, 'arguments': 3, 'outputs': 3,
         'aliased': 3, 'temporaries': 10, 'generated_code': 1, 'total': 14}
  compiled = program.Compiled('train', True, 1.0, mem, {'bytes accessed': 1e12}, found)
  r = report.program_report(c, t, compiled, hbm_bytes=2**30)
  model = flops_per_token(c.model, c.data.seq_len)['train'] * 8 * 16 / 8  # 8 chips
  assert r['model_flops_per_chip'] == pytest.approx(model)
  roof = r['roofline']
  assert roof['compute_s'] == pytest.approx(model * 4 / 3 / 197e12)  # full remat recomputes
  assert roof['hbm_s'] == pytest.approx(1e12 / 819e9)
  assert roof['ici_s'] == pytest.approx(2 * 8e9 * 3 / 4 / 400e9)
  assert roof['dcn_s'] == pytest.approx(2 * 1e9 * 1 / 2 / 3.125e9)
  assert roof['step_s'] == pytest.approx(max(roof['hbm_s'], roof['ici_s'] + roof['dcn_s']))
  assert roof['bound'] == 'memory' and roof['step_s'] == roof['hbm_s']
  assert roof['mfu'] == pytest.approx(model / 197e12 / roof['step_s'])
  assert roof['serial_step_s'] == pytest.approx(roof['compute_s'] + roof['ici_s'] + roof['dcn_s'])
  assert r['headroom_gib'] == pytest.approx((2**30 - 14) / 2**30, abs=1e-3)


@LIBTPU
@pytest.mark.parametrize('dispatch', ['capacity', 'einsum'])
def test_token_dropping_paths_compile_on_tpu_and_say_what_they_move(v5e4, dispatch):
  """GSPMD turns the capacity and einsum paths under an expert axis into collectives of its
  own choosing; they compile, and what they move is reported over the expert axis (einsum:
  all-to-all of the dispatched buffers, as GShard; capacity: gathers)."""
  from moejax.compile import program
  c = _tpu_config(dispatch)
  _, (compiled,) = program.compile_config(c, v5e4, ('train',))
  kinds = {x.kind for x in compiled.collectives if 'expert' in x.axes}
  assert compiled.fits and kinds
  if dispatch == 'einsum':
    assert 'all-to-all' in kinds


@LIBTPU
@pytest.mark.parametrize('backend', [pytest.param('blocked', marks=pytest.mark.slow),
                                     'ragged_dot', 'tokamax'])  # blocked: CPU's, slow step
def test_every_dropless_backend_compiles_for_tpu(v5e4, backend):
  """The blocked CPU kernel, XLA's ragged_dot and tokamax (Pallas Mosaic on TPU) each compile
  inside the ragged expert-parallel path for a TPU target."""
  if backend == 'tokamax':
    pytest.importorskip('tokamax')
  from moejax.compile import program
  c = _tpu_config('auto')
  c.model.moe.experts.backend = backend
  _, (compiled,) = program.compile_config(c, v5e4, ('train',))
  assert compiled.fits


@LIBTPU
def test_two_slices_put_the_data_axis_over_the_dcn(v5e4):
  """--slices=2: the data axis's outer factor crosses the data-center network, laid by slice;
  what crosses it is the gradients' reduction only: all-reduces, and at most one slice's
  activation gradients gathered for the embedding's scatter-add (the compiler's cheaper way
  to reduce that table's gradient). No token exchange and no weight gather crosses slices."""
  from moejax.compile import program
  c = _tpu_config('auto', data=2)
  topo = chips.parse_topology('v5e-4', slices=2)
  t, (compiled,) = program.compile_config(c, topo, ('train',))
  assert t.hlo_axes == {'data': 1, 'fsdp': 1, 'expert': 4, 'tensor': 1}
  # The hybrid mesh: each slice's four chips along the expert axis, the slices along data.
  slice_of = np.vectorize(lambda d: d.slice_index)(t.mesh.devices)
  assert (slice_of == np.arange(2).reshape(2, 1, 1, 1)).all()
  dcn = [x for x in compiled.collectives if x.axes == ('dcn',)]
  assert dcn and all(x.group_size == 2 for x in dcn)
  assert {x.kind for x in dcn} <= {'all-reduce', 'all-gather'} and 'all-reduce' in {
      x.kind for x in dcn}
  m = c.model
  per_chip_tokens = c.train.batch_size // 8 * c.data.seq_len
  gathered = sum(x.bytes * x.runs for x in dcn if x.kind == 'all-gather')
  assert gathered <= per_chip_tokens * m.d_model * 2  # bf16 activation gradients, one chip's
  assert all(x.axes in (('expert',), ('dcn',)) for x in compiled.collectives)
  ragged = [x for x in compiled.collectives if x.kind == 'ragged-all-to-all']
  assert ragged and all(x.axes == ('expert',) for x in ragged)
  with pytest.raises(ConfigError, match=r'mesh.data=1: the devices are 2 slices and the data '
                     r'axis spans them, so it must be a multiple of 2 \(or set mesh.dcn_fsdp=2'):
    program.target(_tpu_config('auto', data=1, expert=8), topo)
  for bad, match in ((dict(dcn_fsdp=2, data=2), r'mesh.dcn_fsdp=2: must divide mesh.fsdp=1'),
                     (dict(dcn_data=4, data=4, expert=2), r'mesh.dcn_data=4: the dcn '
                      r'axes span 4 slices but the devices are 2 slices; make their product 2'),
                     (dict(dcn_data=0, data=2), r'mesh.dcn_data=0: must be at least 1')):
    with pytest.raises(ConfigError, match=match):
      program.target(_tpu_config('auto', **bad), topo)


@LIBTPU
def test_one_slice_lays_the_expert_axis_around_the_torus(v5e4):
  """On one v5e-4 slice (a 2x2 torus) the four chips of the expert axis follow jax's
  topology-aware order, a ring (0, 1, 3, 2) in which each step is one ICI hop, not the
  devices' id order (0 to 3 goes diagonally across the torus)."""
  from moejax.compile import program
  t = program.target(_tpu_config('auto'), v5e4)
  assert [d.id for d in t.mesh.devices.flat] == [0, 1, 3, 2]
  coords = [tuple(d.coords[:2]) for d in t.mesh.devices.flat]
  assert all(sum(abs(a - b) for a, b in zip(coords[i], coords[(i + 1) % 4])) == 1
             for i in range(4))


@LIBTPU
@pytest.mark.slow  # a second two-slice compile
def test_two_slices_over_the_fsdp_axis():
  """mesh.dcn_fsdp=2: the fsdp axis spans the slices instead (laid by slice), so the weights'
  gathers cross them, and the experts' token exchange still stays inside a slice."""
  from moejax.compile import program
  c = _tpu_config('auto', fsdp=2, dcn_fsdp=2)
  t, (compiled,) = program.compile_config(c, chips.parse_topology('v5e-4', slices=2), ('train',))
  assert t.hlo_axes == {'data': 1, 'fsdp': 1, 'expert': 4, 'tensor': 1}
  slice_of = np.vectorize(lambda d: d.slice_index)(t.mesh.devices)
  assert (slice_of == np.arange(2).reshape(1, 2, 1, 1)).all()
  dcn = [x for x in compiled.collectives if x.axes == ('dcn',)]
  assert {'all-gather', 'all-reduce'} <= {x.kind for x in dcn}
  ragged = [x for x in compiled.collectives if x.kind == 'ragged-all-to-all']
  assert ragged and all(x.axes == ('expert',) for x in ragged)


@LIBTPU
@pytest.mark.slow  # two candidates compiled for a TPU
def test_search_ranks_what_fits_and_reuses_its_compiles(tmp_path, capsys, monkeypatch):
  """Two candidates compiled and ranked by time per token; the second search reads them from
  search_cache.json instead of compiling (a compile there would fail this test)."""
  args = ['--config=mixtral_8x7b:tiny', '--topology=v5e-4', '--search', '--max_candidates=2',
          '--remats=none', '--dispatches=auto', f'--out={tmp_path}', '--json',
          '--config.model.dtype=bfloat16']
  assert main(args) == 0
  report = json.loads(capsys.readouterr().out)
  ranked = report['ranked']
  assert report['header']['compiled'] == 2 and len(ranked) == 2
  per_token = [r['roofline']['step_s'] / r['tokens_per_step'] for r in ranked]
  assert per_token == sorted(per_token)
  assert report['best_overrides'] == ranked[0]['overrides']
  from moejax.compile import program
  monkeypatch.setattr(program, 'compile_config', lambda *a, **k: 1 / 0)
  assert main(args) == 0
  assert json.loads(capsys.readouterr().out)['ranked'] == ranked
  assert main(args[:-1] + ['--remats=some']) == 2
  assert "--remats: 'some'" in capsys.readouterr().err


@LIBTPU
@pytest.mark.slow  # an experiment's cells compiled for a TPU
def test_experiment_cells_and_their_expected_time(tmp_path, capsys):
  """An experiment of one rung and two arms on one v5e chip: each cell's train and eval steps
  compiled, and the expected total = seeds x (steps x train step + eval batches x eval step)."""
  (tmp_path / 'tiny_exp.py').write_text(
      'from moejax.config import base_config\n'
      'from moejax.experiment import Experiment, Rung\n'
      'def get_experiment():\n'
      '  c = base_config()\n'
      '  c.model.d_model, c.model.num_layers, c.model.num_heads, c.model.head_dim = 32, 2, 2, 16\n'
      '  c.model.num_kv_heads, c.model.ffn_dim, c.model.moe.expert_ffn_dim = 2, 64, 32\n'
      '  c.data.seq_len, c.train.batch_size, c.train.steps, c.train.eval_every = 32, 8, 40, 20\n'
      '  c.train.eval_batches, c.train.final_eval_batches = 2, 5\n'
      "  return Experiment(name='tiny', base=c, arms={'a': {}, 'b': {'model.moe.num_experts': 4}},\n"
      "                    seeds=(0, 1, 2), rungs={'r0': Rung({}, seeds=(0, 1))})\n")
  path = str(tmp_path / 'tiny_exp.py')
  assert main([f'--experiment={path}', '--topology=v5e-1', '--json',
               '--config.model.dtype=bfloat16']) == 0
  report = json.loads(capsys.readouterr().out)
  cells = report['cells']
  assert [(x['rung'], x['arm'], x['seeds']) for x in cells] == [('r0', 'a', 2), ('r0', 'b', 2)]
  total = 0
  for x in cells:
    run = 40 * x['train']['roofline']['step_s'] + (2 * 2 + 5) * x['eval']['roofline']['step_s']
    assert x['run_s'] == pytest.approx(run)
    total += 2 * run
  assert report['expected_total_s'] == pytest.approx(total)
  assert report['header']['runs'] == 4
  assert main([f'--experiment={path}', '--topology=v5e-1', '--config=quickstart']) == 2


@LIBTPU
@pytest.mark.slow
def test_mixtral_8x7b_on_v5p_32():
  """The published Mixtral 8x7B in bfloat16 on 16 v5p chips (fsdp 2 x expert 8, 16 x 4096
  tokens, full remat): it fits; tokens cross the expert axis by ragged all-to-all, no whole
  expert weight (bf16 or f32 [8, 4096, 14336]) is ever gathered; the planner's train state is
  the compiler's argument bytes within 1%."""
  from moejax.cli.configs import load_config
  from moejax.compile import program, report
  from moejax.config import set_fields
  c = set_fields(load_config('mixtral_8x7b'), {
      'model.dtype': 'bfloat16', 'model.remat': 'full', 'data.seq_len': 4096,
      'train.batch_size': 16, 'mesh.data': 1, 'mesh.fsdp': 2, 'mesh.expert': 8})
  topo = chips.parse_topology('v5p-32')
  t, (compiled,) = program.compile_config(c, topo, ('train',))
  r = report.program_report(c, t, compiled, chips.usable_hbm(topo))
  assert r['fits'] and 0.99 <= r['planner']['ratio'] <= 1.01
  assert 'ragged-all-to-all' in r['collectives']
  assert set(r['collectives']['ragged-all-to-all']['by_axes']) == {'expert'}
  assert not _expert_weight_gathers(compiled.collectives, c)
  assert r['roofline']['bound'] == 'compute'


def test_search_splits_the_axes_that_span_slices_evenly_over_them():
  """--search with --slices=2: the candidates' data axis is a multiple of 2, or with
  mesh.dcn_fsdp=2 their fsdp axis is (and the data axis then need not be)."""
  from moejax.compile.search import meshes
  c = tiny_config()
  found = meshes(c, 8, 8, slices=2)
  assert found and all(m['data'] % 2 == 0 for m in found)
  c.mesh.dcn_fsdp = 2
  found = meshes(c, 8, 8, slices=2)
  assert found and all(m['fsdp'] % 2 == 0 for m in found)
  assert any(m['data'] % 2 for m in found)
