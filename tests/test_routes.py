"""Routing analysis, traces and replay (moejax/routes): each statistic on hand-made routings
with known answers; the trace format and its refusals; replay reproducing the traced pass
exactly, in evaluation, training and generation; the command on a short native run and on a
tiny imported Hugging Face model; the token view in a real browser (slow)."""
import dataclasses
import json
import math
import re
import shutil
import subprocess

import jax
import numpy as np
import pytest

from conftest import tiny_config
from moejax.errors import ConfigError
from moejax.routes import analysis, collect, page, trace as traces


def _idx(layers):
  """[[token slots] per layer] -> expert_index [1, L, M, K]."""
  return np.asarray(layers, np.int32).transpose(1, 0, 2)[None]


# ---------------------------------------------------------------- statistics, by hand


def test_layer_stats_by_hand():
  """Three layers of 4 tokens x 2 slots, N = 4 (4 marks a null slot)."""
  index = _idx([[[0, 4], [0, 4], [0, 1], [0, 4]],   # loads 4, 1, 0, 0
                [[0, 1], [2, 3], [4, 4], [4, 4]],   # 1, 1, 1, 1
                [[0, 1], [0, 1], [0, 1], [0, 1]]])  # 4, 4, 0, 0
  s = analysis.layer_stats(index, 4)
  np.testing.assert_allclose(s['load'][0], [0.8, 0.2, 0, 0])  # null slots left out
  np.testing.assert_allclose(s['max_vio'], [(4 - 1.25) / 1.25, 0.0, (4 - 2) / 2])
  np.testing.assert_allclose(s['load_entropy'],
                             [-(0.8 * math.log(0.8) + 0.2 * math.log(0.2)), math.log(4),
                              math.log(2)])
  assert s['dead_experts'] == [2, 0, 2]
  # across layers: MaxVio values 2.2, 0, 1 -> median 1, p90 1 + 0.8 * (2.2 - 1), max 2.2
  np.testing.assert_allclose([s['max_vio_across_layers'][q] for q in ('median', 'p90', 'max')],
                             [1.0, 1.96, 2.2])


def test_a_router_that_sends_each_domain_to_its_own_expert_gives_a_diagonal_map():
  n = 4
  by_set = {'a': np.zeros((3, 5, 1, 1), np.int32),           # every token to expert 0
            'b': np.full((2, 5, 1, 1), 3, np.int32),          # every token to expert 3
            'c': np.asarray([1, 2] * 5, np.int32).reshape(1, 10, 1, 1)}  # 1 and 2 evenly
  spec = analysis.domain_specialization(by_set, n)
  np.testing.assert_allclose(spec['a'], [[4, 0, 0, 0]])
  np.testing.assert_allclose(spec['b'], [[0, 0, 0, 4]])
  np.testing.assert_allclose(spec['c'], [[0, 2, 2, 0]])


def test_coactivation_by_hand_and_not_symmetric():
  """Experts always chosen together give 1; the map is not symmetric (i's tokens that j
  serves), so a transposed map fails."""
  index = _idx([[[0, 3], [0, 3], [0, 1], [0, 1], [1, 2], [2, 4]]])  # N = 4; 4: null slot
  co = analysis.coactivation(index, 4)[0]
  assert co[3, 0] == 1.0 and co[0, 3] == 0.5  # 3 only with 0; half of 0's tokens have 3
  np.testing.assert_allclose([co[1, 0], co[0, 1], co[1, 2], co[2, 1]], [2 / 3, 0.5, 1 / 3, 0.5])
  np.testing.assert_allclose(np.diag(co), [1, 1, 1, 1])
  assert co[2, 3] == 0 and co[3, 2] == 0
  always = analysis.coactivation(_idx([[[1, 2], [2, 1], [1, 2]]]), 4)[0]
  assert always[1, 2] == always[2, 1] == 1.0


def test_vocabulary_specialization_by_hand():
  """Token 5 always goes to experts 2 and 3 (concentration 1, also with K = 2 slots); token 6
  half to 0 and half to 1 (0.5); token 7 is seen twice, under min_count."""
  tokens = np.asarray([5] * 5 + [6] * 6 + [7] * 2)[None]
  slots = [[2, 3]] * 5 + [[0, 4], [0, 4], [0, 4], [1, 4], [1, 4], [1, 4]] + [[1, 0]] * 2
  voc = analysis.vocabulary(_idx([slots]), tokens, 4, 10)['layers'][0]
  assert voc['most_concentrated'] == [(5, 1.0), (6, 0.5)]
  np.testing.assert_allclose(voc['mean_concentration'], (1.0 * 5 + 0.5 * 6) / 11)
  assert voc['top_tokens'][2] == [(5, 5)] and voc['top_tokens'][3] == [(5, 5)]
  assert voc['top_tokens'][0] == [(6, 3), (7, 2)]
  assert voc['top_tokens'][1] == [(6, 3), (7, 2)]


def test_normalized_mutual_information_by_hand():
  nmi = analysis.normalized_mutual_information
  assert nmi([0, 0, 1, 1, 2, 2], [5, 5, 3, 3, 9, 9]) == pytest.approx(1.0)  # a relabeling
  assert nmi([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)  # independent
  # a = [0, 0, 1, 1], b = [0, 0, 0, 1]: I = .5 ln(4/3) + .25 ln(2/3) + .25 ln 2
  mi = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
  ha, hb = math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
  assert nmi([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(mi / ((ha + hb) / 2))
  # consecutive layers: layer 1 a permutation of layer 0, layer 2 independent of layer 1
  l0 = np.asarray([0, 0, 1, 1])
  index = np.stack([l0, (l0 + 1) % 2, np.asarray([0, 1, 0, 1])], axis=-1)[None, :, :, None]
  np.testing.assert_allclose(analysis.cross_layer_agreement(index), [1.0, 0.0], atol=1e-12)
  # With two slots, the first slot (the top expert) is what is compared: the second slots here
  # are a constant in layer 0 and independent of layer 1's top expert.
  top = np.stack([l0, (l0 + 1) % 2], axis=-1)  # [4, M=2]
  second = np.stack([np.full(4, 7), np.asarray([0, 1, 0, 1]) + 2], axis=-1)
  index = np.stack([top, second], axis=-1)[None]  # [1, 4, 2, 2]
  np.testing.assert_allclose(analysis.cross_layer_agreement(index), [1.0], atol=1e-12)


def test_saturation_by_hand():
  """Token 0 keeps its experts (in another order): 1; token 1 keeps one of two: 0.5."""
  now = np.asarray([[0, 1], [2, 3]])[None, :, None]
  final = np.asarray([[1, 0], [2, 5]])[None, :, None]
  assert analysis.saturation(now, final, 8) == 0.75
  assert analysis.saturation(final, final, 8) == 1.0
  # Null slots (ids >= N) are no experts: a null slot in both is not a kept expert, and a
  # token with one real expert at the end is saturated when it keeps that one.
  now = np.asarray([[0, 8], [2, 3]])[None, :, None]
  final = np.asarray([[0, 8], [3, 8]])[None, :, None]
  assert analysis.saturation(now, final, 8) == 1.0
  now = np.asarray([[1, 8], [2, 8]])[None, :, None]
  assert analysis.saturation(now, final, 8) == 0.0


# ---------------------------------------------------------------- the trace format


def _trace(s=2, l=3, m=2, k=2, n=8, seed=0):
  rng = np.random.default_rng(seed)
  return traces.Trace(rng.integers(0, n, (s, l, m, k)).astype(np.int32),
                      rng.integers(0, 258, (s, l)).astype(np.int32),
                      rng.random((s, l, m, k)).astype(np.float32), np.asarray([1, 2]), n)


def test_trace_round_trip_and_the_model_layout(tmp_path):
  t = _trace()
  path = traces.write(str(tmp_path / 't.npz'), t)
  back = traces.read(path)
  for name in ('expert_index', 'token_ids', 'weights', 'moe_layers'):
    np.testing.assert_array_equal(getattr(back, name), getattr(t, name))
  assert back.num_experts == 8 and back.expert_index.dtype == np.int32
  # [b, s, M, K] <-> [M, b * s, K] with every axis a different size
  x = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
  model = traces.to_model(x)
  assert model.shape == (4, 6, 5)
  np.testing.assert_array_equal(model[2, 1 * 3 + 2], x[1, 2, 2])
  np.testing.assert_array_equal(traces.from_model(model, 2), x)
  # an engine's trace: expert ids only, no weights, tokens, layers or N
  np.savez(tmp_path / 'engine.npz', expert_index=x % 8)
  bare = traces.read(str(tmp_path / 'engine.npz'))
  assert bare.weights is None and bare.token_ids is None and bare.num_experts is None


@pytest.mark.parametrize('edit, words', [
    (lambda t: setattr(t, 'expert_index', t.expert_index[0]), 'a trace is [sequences, tokens'),
    (lambda t: setattr(t, 'expert_index', t.expert_index[:, :, :1]), '1 MoE layers'),
    (lambda t: setattr(t, 'expert_index', t.expert_index[..., :1]), '1 experts per token'),
    (lambda t: t.expert_index.__setitem__((0, 0, 0, 0), 9), 'expert id 9'),
    (lambda t: t.expert_index.__setitem__((1, 2, 1, 1), -1), 'expert id -1'),
    (lambda t: setattr(t, 'token_ids', t.token_ids[:, :2]), 'token_ids has shape [2, 2]'),
    (lambda t: t.token_ids.__setitem__((0, 0), 300), 'token id 300'),
    (lambda t: t.token_ids.__setitem__((1, 1), 258), 'token id 258 is outside'),
    (lambda t: setattr(t, 'moe_layers', np.asarray([1, 3])), 'traced at MoE layers [1, 3]'),
    (lambda t: setattr(t, 'token_ids', None), 'holds no token_ids'),
])
def test_a_trace_that_does_not_fit_the_model_is_refused_naming_the_mismatch(edit, words):
  model = tiny_config().model  # MoE layers [1, 2], 8 experts, K = 2, vocabulary 258
  t = _trace()
  traces.check(t, model, need_tokens=True)  # the unedited trace fits
  edit(t)
  with pytest.raises(ConfigError, match=re.escape(words)) as e:
    traces.check(t, model, need_tokens=True)
  assert '\n' not in str(e.value)


def test_what_is_not_a_trace_is_refused(tmp_path):
  (tmp_path / 'text.npz').write_text('not numpy')
  with pytest.raises(ConfigError, match='not a NumPy .npz file'):
    traces.read(str(tmp_path / 'text.npz'))
  np.savez(tmp_path / 'other.npz', routes=np.zeros(3))
  with pytest.raises(ConfigError, match='holds no expert_index array.*it has routes'):
    traces.read(str(tmp_path / 'other.npz'))
  with pytest.raises(ConfigError, match='no such file'):
    traces.read(str(tmp_path / 'missing.npz'))


# ---------------------------------------------------------------- replay


@pytest.fixture(scope='module')
def tiny_run():
  from moejax.training import workdir as workdirs
  run = workdirs.open_run(tiny_config(), jax.devices()[:1])
  return run, run.trainer.init(0)


def _rows(seed=0, shape=(8, 16)):
  return np.random.default_rng(seed).integers(0, 258, shape).astype(np.int32)


def test_replaying_a_trace_reproduces_the_logits_and_loss_exactly(tiny_run):
  run, state = tiny_run
  rows = _rows()
  got = collect.collect(run, state, rows, batch=4)  # two batches
  assert got.trace.expert_index.shape == (8, 16, 2, 2)
  logits, aux = collect.forward(run, state, rows)
  replayed, raux = collect.forward(run, state, rows, got.trace.expert_index)
  np.testing.assert_array_equal(np.asarray(replayed), np.asarray(logits))
  again = collect.collect(run, state, rows, batch=4, replay=got.trace.expert_index)
  np.testing.assert_array_equal(again.row_loss, got.row_loss)
  np.testing.assert_array_equal(again.trace.expert_index, got.trace.expert_index)
  np.testing.assert_array_equal(again.trace.weights, got.trace.weights)
  np.testing.assert_array_equal(np.asarray(raux['combine_weights']),
                                np.asarray(aux['combine_weights']))
  # The loss is the next-token loss within the rows, by hand for one row.
  logp = jax.nn.log_softmax(np.asarray(logits[3], np.float64)[:-1])
  np.testing.assert_allclose(got.row_loss[3], -np.mean(logp[np.arange(15), rows[3, 1:]]),
                             rtol=1e-5)
  # Other routes are followed, not ignored: the logits move and the experts are the given ones.
  other = (got.trace.expert_index + 1) % 8
  moved, maux = collect.forward(run, state, rows, other)
  np.testing.assert_array_equal(traces.from_model(np.asarray(maux['expert_index']), 8), other)
  assert np.max(np.abs(np.asarray(moved) - np.asarray(logits))) > 1e-3


def test_replay_in_training_gives_the_gradients_of_the_routing_it_replays(tiny_run):
  """The training loss with the batch's own routing replayed has the loss and gradients of
  the free pass; another routing gives other gradients (the gates' too: weights come from the
  router's scores for the replayed experts)."""
  run, state = tiny_run
  trainer = run.trainer
  rows = _rows(1, (8, 17))
  batch = {'inputs': rows[:, :-1], 'targets': rows[:, 1:]}
  rng = jax.random.key(0)
  variables = {'params': state.params, **state.model_state}
  with trainer.context():
    (_, aux), _ = jax.jit(lambda v, x: trainer.model.apply(v, x, rngs={'router': rng},
                                                            mutable=['bias_updates']))(
        variables, batch['inputs'])
  own = traces.from_model(np.asarray(aux['expert_index']), 8)
  value_and_grad = jax.jit(jax.value_and_grad(
      lambda p, b: trainer.loss_fn(p, state.model_state, b, rng)[0]))

  def grads(b):
    with trainer.context():
      return value_and_grad(state.params, b)
  loss, g = grads(batch)
  loss_r, g_r = grads({**batch, 'replay': own})
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_r, g)
  loss_o, g_o = grads({**batch, 'replay': (own + 3) % 8})
  router = lambda t: np.asarray(t['moe_layers']['moe_block']['moe']['router']['w'])  # noqa: E731
  assert abs(float(loss_o) - float(loss)) > 1e-4
  assert np.max(np.abs(router(g_o) - router(g))) > 1e-6


@pytest.mark.slow  # a training run on a written trace (replay's gradients: the test above)
def test_training_on_a_trace_routes_every_step_as_recorded(tmp_path):
  """python -m moejax.main --replay: a trace that sends every token to experts 0 and 1 in
  every layer trains with all the load on those two; a trace of the wrong length is refused
  before anything compiles."""
  from moejax.training.loop import train
  from moejax.training.metrics import read_metrics
  rows = _rows(2, (16, 17))
  routes = np.broadcast_to(np.asarray([0, 1], np.int32), (16, 17, 2, 2)).copy()
  path = traces.write(str(tmp_path / 'fixed.npz'), traces.Trace(routes, rows))
  c = tiny_config()
  c.data.replay, c.train.steps, c.train.eval_every, c.train.final_eval_batches = path, 2, 2, 1
  c.train.warmup_steps, c.train.log_every = 1, 1
  train(c, str(tmp_path / 'run'))
  logged = [r for r in read_metrics(str(tmp_path / 'run' / 'metrics.jsonl'))
            if 'moe/expert_load' in r]
  assert len(logged) == 2
  for r in logged:
    np.testing.assert_allclose(np.asarray(r['moe/expert_load'])[:, :2], 0.5)
    assert np.all(np.asarray(r['moe/expert_load'])[:, 2:] == 0)
  # its evaluation is the validation split's, routed by the model: load beyond experts 0, 1
  evals = [r for r in read_metrics(str(tmp_path / 'run' / 'metrics.jsonl')) if 'eval/loss' in r]
  assert evals and np.isfinite(evals[-1]['eval/loss'])
  c.data.seq_len = 15
  with pytest.raises(ConfigError, match=re.escape('--config.data.seq_len=16')):
    train(c, str(tmp_path / 'run2'))


# ---------------------------------------------------------------- the command


def _prepare_sets(root):
  """Two prepared validation sets (byte tokenizer): Python code, and prose with non-ASCII."""
  from moejax.data import corpus
  from moejax.prepare import prepare
  code, prose = root / 'code_src', root / 'prose_src'
  code.mkdir(), prose.mkdir()
  for i, (_, f) in enumerate(corpus.list_files('stdlib')[:6]):
    (code / f'{i}.py').write_text(open(f, encoding='utf-8').read()[:3000])
  words = ('the river ran past élan café naïve über straße the hills and the long road home '
           'where we walked ').split()
  rng = np.random.default_rng(0)
  for i in range(6):
    (prose / f'{i}.txt').write_text(' '.join(rng.choice(words, 400)) + '\n')
  quiet = dict(progress=False, log=lambda *_: None, val_percent=50)
  prepare(str(code), str(root / 'code'), '*.py', **quiet)
  prepare(str(prose), str(root / 'prose'), '*.txt', **quiet)
  return str(root / 'code'), str(root / 'prose')


@pytest.fixture(scope='module')
def native(tmp_path_factory):
  """A short native run keeping checkpoints at steps 3 and 6, two prepared evaluation sets,
  and the command's report and trace."""
  from moejax.routes.__main__ import main as routes_main
  from moejax.training.loop import train
  root = tmp_path_factory.mktemp('routes')
  c = tiny_config()
  train(c, str(root / 'run'))
  code, prose = _prepare_sets(root)
  args = ['--workdir', str(root / 'run'), '--eval_sets', f'code={code},prose={prose}',
          '--out', str(root / 'report'), '--trace', str(root / 'trace.npz'),
          '--max_tokens', '256', '--sample_tokens', '100', '--layer', '1', '--no-progress']
  assert routes_main(args) == 0
  return root, c


def test_the_report_of_a_native_run(native, capsys):
  root, c = native
  report = json.loads((root / 'report' / 'routes.json').read_text())
  trace = traces.read(str(root / 'trace.npz'))
  assert list(report['sets']) == ['code', 'prose']
  # 256 tokens at most per set: 16 sequences of data.seq_len = 16
  assert [s['tokens_routed'] for s in report['sets'].values()] == [256, 256]
  assert trace.expert_index.shape == (32, 16, 2, 2) and trace.weights.shape == (32, 16, 2, 2)
  # The statistics are those of the routing the trace holds (the command's plumbing).
  np.testing.assert_allclose(report['layers']['max_vio'],
                             analysis.layer_stats(trace.expert_index, 8)['max_vio'])
  np.testing.assert_allclose(report['domain_specialization']['prose'],
                             analysis.domain_specialization(
                                 {'p': trace.expert_index[16:]}, 8)['p'])
  np.testing.assert_allclose(np.sum(report['layers']['load'], axis=-1), 1.0)
  # The traced tokens are the evaluation sample of each set's validation split.
  from moejax.data import pipeline
  chunks = pipeline.validation_chunks(str(root / 'code'), 16, 'x')
  sample = pipeline.eval_sample(len(chunks), 16)
  np.testing.assert_array_equal(trace.token_ids[:16],
                                np.stack([chunks[int(i)][:-1] for i in sample]))
  # Saturation over the checkpoints at steps 3 and 6, the last 1.
  assert [s['step'] for s in report['saturation']] == [3, 6]
  assert report['saturation'][-1]['share'] == 1.0 and 0 <= report['saturation'][0]['share'] < 1
  for name in ('load.png', 'specialization.png', 'coactivation.png', 'agreement.png',
               'saturation.png', 'routes.md', 'tokens.html'):
    assert (root / 'report' / name).stat().st_size > 0, name
  md = (root / 'report' / 'routes.md').read_text()
  for section in ('## Load per layer', '## Domain specialization', '## Co-activation',
                  '## Cross-layer agreement', '## Router saturation', '| code |', '| prose |'):
    assert section in md
  # The token view: 100 tokens of the first set, coloured by their top expert at MoE layer 1.
  html = (root / 'report' / 'tokens.html').read_text(encoding='utf-8')
  colours = re.findall(r'<span class="t" style="background:(#[0-9a-f]{6})"', html)
  top = trace.expert_index[:, :, 1, 0].reshape(-1)[:100]
  assert colours == [page.expert_colour(int(e), 8) for e in top]
  assert '<script' not in html and 'http' not in html.split('</title>')[1]


@pytest.mark.slow  # the commands end to end; replay's exactness: the tests above
def test_the_commands_replay_a_trace_they_wrote(native, capsys):
  """routes --replay reproduces the traced pass (loss, logits, experts); generate --replay
  prefills the trace's sequence routed as recorded and continues as the model would."""
  from moejax import generate as gen
  from moejax.routes.__main__ import main as routes_main
  root, _ = native
  trace = str(root / 'trace.npz')
  assert routes_main(['--workdir', str(root / 'run'), '--replay', trace, '--out',
                      str(root / 'replayed'), '--no-progress']) == 0
  r = json.loads((root / 'replayed' / 'routes.json').read_text())
  assert r['replay']['agreement'] == 1.0 and r['replay']['max_logit_diff'] == 0.0
  assert r['replay']['loss_replayed'] == r['replay']['loss_own']
  # Agreement is about which experts, not which slot: the same trace with each token's experts
  # listed in reverse order still agrees fully (a slot-by-slot comparison would not).
  t = traces.read(trace)
  flipped = str(root / 'flipped.npz')
  traces.write(flipped, dataclasses.replace(t, expert_index=t.expert_index[..., ::-1],
                                            weights=t.weights[..., ::-1]))
  assert (t.expert_index[..., 0] != t.expert_index[..., -1]).any()
  assert routes_main(['--workdir', str(root / 'run'), '--replay', flipped, '--out',
                      str(root / 'flipped'), '--no-progress', '--sample_tokens', '0',
                      '--saturation_checkpoints', '0']) == 0
  r = json.loads((root / 'flipped' / 'routes.json').read_text())
  assert r['replay']['agreement'] == 1.0
  assert r['replay']['loss_replayed'] == pytest.approx(r['replay']['loss_own'], rel=1e-5)
  first = json.loads((root / 'report' / 'routes.json').read_text())
  expected = (first['sets']['code']['loss'] * 16 + first['sets']['prose']['loss'] * 16) / 32
  assert r['sets']['trace']['loss'] == pytest.approx(expected, rel=1e-6)
  capsys.readouterr()
  assert gen.main(['--workdir', str(root / 'run'), '--replay', trace, '--replay_row', '3',
                   '--max_new_tokens', '5', '--temperature', '0']) == 0
  out = capsys.readouterr().out
  config, variables = gen.load_checkpoint(str(root / 'run'))
  t = traces.read(trace)
  ids = gen.generate(config.model, variables, t.token_ids[3][None], 5, 0.0)
  from moejax.data.tokenizer import ByteTokenizer
  tok = ByteTokenizer()
  assert out == tok.decode(t.token_ids[3]) + tok.decode(ids[0]) + '\n'


def test_command_refusals_are_one_line(native, tmp_path, capsys):
  from moejax.routes.__main__ import main as routes_main
  root, _ = native
  run = str(root / 'run')
  bad_k = _trace(s=2, l=16, m=2, k=3)
  traces.write(str(tmp_path / 'k3.npz'), bad_k)
  cases = [
      (['--layer', '2'], '--layer=2: the model has 2 MoE layers'),
      (['--max_tokens', '0'], '--max_tokens=0: must be at least 1'),
      (['--eval_sets', f'x={tmp_path / "nope"}'], '--eval_sets='),
      (['--replay', str(tmp_path / 'k3.npz')], '3 experts per token'),
      (['--replay', str(tmp_path / 'k3.npz'), '--eval_sets', 'a=b'], 'give one of them'),
      (['--trace', str(tmp_path)], 'is a folder'),
  ]
  for extra, words in cases:
    capsys.readouterr()
    assert routes_main(['--workdir', run, '--no-progress', *extra]) == 2, extra
    err = capsys.readouterr().err
    assert words in err and err.count('\n') == 1, (extra, err)
  assert routes_main(['--workdir', str(tmp_path)]) == 2
  assert 'no checkpoint' in capsys.readouterr().err


def test_the_report_of_a_tiny_imported_model(tmp_path):
  """A tiny random Mixtral imported with its BPE tokenizer: the report runs on its own
  validation split, decodes its tokens with that tokenizer, and routes with its 4 experts."""
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  from hf_models import build as _build
  from moejax import hf
  from moejax.data import corpus, tokenizer as tokenizers
  from moejax.routes.__main__ import main as routes_main
  texts = [open(f, encoding='utf-8').read() for _, f in corpus.list_files('stdlib')[:20]]
  tokenizers.train_bpe(texts, 320, str(tmp_path / 'hf'))
  _build('mixtral', tmp_path / 'hf')
  work = tmp_path / 'work'
  hf.import_workdir(str(tmp_path / 'hf'), str(work), log=lambda *_: None)
  assert routes_main(['--workdir', str(work), '--max_tokens', '1024', '--no-progress',
                      '--trace', str(tmp_path / 't.npz')]) == 0
  report = json.loads((work / 'routes' / 'routes.json').read_text())
  t = traces.read(str(tmp_path / 't.npz'))
  assert report['num_experts'] == 4 and report['moe_layers'] == [0, 1, 2]
  assert t.expert_index.shape[2:] == (3, 2) and t.token_ids.max() < 320
  tok = tokenizers.from_dir(str(work))
  md = (work / 'routes' / 'routes.md').read_text(encoding='utf-8')
  top = report['vocabulary']['layers'][0]['top_tokens'][0][0][0]  # expert 0's first token
  assert json.dumps(tok.decode([top]), ensure_ascii=False)[1:-1].replace('|', '\\|') in md


# ---------------------------------------------------------------- the token view in a browser


def _browser():
  for name in ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable'):
    if shutil.which(name):
      return shutil.which(name)
  return None


@pytest.mark.slow
@pytest.mark.skipif(_browser() is None, reason='no headless Chromium on this machine '
                    '(apt-get install chromium)')
def test_the_token_view_renders_coloured_text_in_a_browser(tmp_path):
  """tokens.html of a hand-made routing, rendered by headless Chromium: the screenshot shows
  each top expert's colour in proportion to its tokens, with dark text on it."""
  from PIL import Image
  n = 6
  pieces = [f'tok{i:02d} ' for i in range(60)]
  top = np.asarray([0] * 30 + [2] * 20 + [5] * 10)  # 30 : 20 : 10 tokens of equal width
  experts = np.stack([top, (top + 1) % n], axis=-1)
  weights = np.full(experts.shape, 0.5)
  (tmp_path / 'tokens.html').write_text(page.render(pieces, experts, weights, n, 'test', 'x'),
                                        encoding='utf-8')
  shot = tmp_path / 'shot.png'
  subprocess.run([_browser(), '--headless', '--no-sandbox', '--disable-gpu',
                  '--hide-scrollbars', '--force-device-scale-factor=1',
                  f'--screenshot={shot}', '--window-size=1000,800',
                  (tmp_path / 'tokens.html').as_uri()],
                 check=True, capture_output=True, timeout=120)
  img = np.asarray(Image.open(shot).convert('RGB')).astype(int)

  def pixels(hex_colour):
    rgb = np.asarray([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int(np.sum(np.all(np.abs(img - rgb) <= 2, axis=-1)))
  counts = [pixels(page.expert_colour(e, n)) for e in (0, 2, 5)]
  legend = [pixels(page.expert_colour(e, n)) for e in (1, 3, 4)]  # not anyone's top expert
  assert min(counts) > 500, counts
  assert max(legend) == 0, legend
  # 30 : 20 : 10 tokens (the legend swatches add the same small area to each)
  assert counts[0] > counts[1] > counts[2]
  np.testing.assert_allclose(counts[0] / counts[2], 3.0, rtol=0.35)
  # text on the coloured background: dark pixels inside the rows of coloured pixels
  coloured = np.zeros(img.shape[:2], bool)
  for e in (0, 2, 5):
    rgb = np.asarray([int(page.expert_colour(e, n)[i:i + 2], 16) for i in (1, 3, 5)])
    coloured |= np.all(np.abs(img - rgb) <= 2, axis=-1)
  rows = np.nonzero(coloured.sum(1) > 50)[0]
  dark = np.all(img[rows] < 90, axis=-1)
  assert dark.sum() > 500
