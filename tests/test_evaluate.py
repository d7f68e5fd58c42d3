"""python -m moejax.evaluate: lm-evaluation-harness on a moejax checkpoint. Log-likelihoods equal
a hand computation from the model's logits (lm-eval's token boundary written out here) and what
lm-eval's own `hf` backend computes on the same transformers model; tasks read local files;
every user error is one line."""
import json
import os

import numpy as np
import pytest

lm_eval = pytest.importorskip('lm_eval')
torch = pytest.importorskip('torch')

from moejax.evaluate.__main__ import main  # noqa: E402
from moejax.evaluate.tasks import offline  # noqa: E402

offline()
HERE = os.path.dirname(os.path.abspath(__file__))

# Multiple choice with non-ASCII text (multi-byte UTF-8 in contexts and choices) and a context
# ending in a space (lm-eval moves it into the continuation).
CHOICE = [
    {'question': 'def main(', 'choices': ['):', 'self):', 'x, y):'], 'answer': 1},
    {'question': 'import ', 'choices': ['os', 'sys', 'naïve'], 'answer': 0},
    {'question': 'Größe = ', 'choices': ['1', '"zwölf"', 'None'], 'answer': 2},
    {'question': 'return', 'choices': [' True', ' None', ' é'], 'answer': 0},
    {'question': 'class Foo(', 'choices': ['object):', 'Bar):'], 'answer': 0},
]
TEXTS = [{'text': 'def f(x):\n    return x + 1\n'},
         {'text': 'Ünïcödé text, then code: for i in range(10):\n    print(i)\n' * 3}]


def _yaml(folder, name, data_file, body):
  with open(os.path.join(folder, f'{name}.yaml'), 'w', encoding='utf-8') as f:
    f.write(f'task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n'
            f'    test: {data_file}\ntest_split: test\n{body}')


@pytest.fixture(scope='module')
def tasks(tmp_path_factory):
  """A folder of task YAMLs over local JSON lines: multiple choice, rolling, generation."""
  root = tmp_path_factory.mktemp('tasks')
  for name, rows in (('choice', CHOICE), ('texts', TEXTS)):
    with open(root / f'{name}.jsonl', 'w', encoding='utf-8') as f:
      f.writelines(json.dumps(r, ensure_ascii=False) + '\n' for r in rows)
  _yaml(root, 'tiny_choice', root / 'choice.jsonl',
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        'metric_list:\n  - metric: acc\n')
  _yaml(root, 'tiny_rolling', root / 'texts.jsonl',
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        'metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n')
  _yaml(root, 'tiny_generate', root / 'choice.jsonl',
        'output_type: generate_until\ndoc_to_text: "{{question}}"\n'
        'doc_to_target: "{{choices[answer]}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 5\n  do_sample: false\n'
        'metric_list:\n  - metric: exact_match\n')
  _yaml(root, 'tiny_missing', root / 'nowhere.jsonl',
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n')
  return str(root)


def _tokenizer_with_bos(folder):
  """A byte-level BPE whose post-processor puts <s> (BOS) before every encoding, as Llama's
  does: the prefix token and the special tokens of lm-eval's encoding both matter."""
  from tokenizers import Tokenizer, processors
  from moejax.data import corpus, tokenizer as tokenizers
  texts = [open(f, encoding='utf-8').read() for _, f in corpus.list_files('stdlib')[:20]]
  tokenizers.train_bpe(texts, 319, str(folder))
  path = os.path.join(folder, 'tokenizer.json')
  tok = Tokenizer.from_file(path)
  tok.add_special_tokens(['<s>'])
  bos = tok.token_to_id('<s>')
  assert bos == 319
  tok.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[
      ('<s>', bos)])
  tok.save(path)
  with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
    json.dump({'eos_token': '<|endoftext|>', 'pad_token': '<|pad|>', 'bos_token': '<s>',
               'tokenizer_class': 'PreTrainedTokenizerFast'}, f)


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  """A tiny random Mixtral in transformers' format with a BOS-adding BPE tokenizer, and its
  import into a moejax workdir."""
  import sys
  sys.path.insert(0, HERE)
  from hf_models import build
  from moejax import hf
  root = tmp_path_factory.mktemp('model')
  _tokenizer_with_bos(root / 'hf')
  # The model's own special ids are the tokenizer's, so transformers' generate stops where
  # moejax's does (at <|endoftext|>).
  build('mixtral', root / 'hf', eos_token_id=0, pad_token_id=1, bos_token_id=319)
  hf.import_workdir(str(root / 'hf'), str(root / 'work'), log=lambda *_: None)
  return str(root / 'hf'), str(root / 'work')


def _requests(kind, args):
  from lm_eval.api.instance import Instance
  return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


PAIRS = [('def main(', 'self):'), ('def main( ', 'x):'), ('Größe =', ' "zwölf"'),
         ('', 'import os'), ('x' * 300, ' = 1')]  # the last is cut to the model's 256


def _by_hand(work, pairs):
  """Each pair's (log-likelihood, greedy) from the model's logits in float64, tokenized as
  lm-eval's TemplateLM defines it."""
  import jax
  from tokenizers import Tokenizer
  from moejax.generate import load_checkpoint
  from moejax.model.transformer import Transformer
  import ml_collections
  config, variables = load_checkpoint(work)
  tok = Tokenizer.from_file(os.path.join(work, 'tokenizer.json'))
  enc = lambda s, special=True: tok.encode(s, add_special_tokens=special).ids  # noqa: E731
  model = Transformer(ml_collections.FrozenConfigDict(config.model), train=False)
  out = []
  for context, continuation in pairs:
    if context == '':
      ctx, cont = [tok.token_to_id('<s>')], enc(continuation, False)
    else:
      n = len(context) - len(context.rstrip())
      if n:
        context, continuation = context[:-n], context[-n:] + continuation
      whole, ctx = enc(context + continuation), enc(context)
      cont = whole[len(ctx):]
    row = (ctx + cont)[-257:]
    inputs = np.asarray(row[:-1])[None]
    logits = np.asarray(jax.jit(model.apply)(variables, inputs)[0][0], np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    first = len(row) - 1 - len(cont)
    lp = sum(logits[first + j, t] - logz[first + j] for j, t in enumerate(cont))
    greedy = all(int(np.argmax(logits[first + j])) == t for j, t in enumerate(cont))
    out.append((lp, greedy))
  return out


def test_loglikelihoods_equal_a_hand_computation_at_any_batch_size(model):
  from moejax.evaluate.harness import MoejaxLM
  _, work = model
  want = _by_hand(work, PAIRS)
  for batch_size in (1, 3):
    got = MoejaxLM(work, batch_size=batch_size).loglikelihood(
        _requests('loglikelihood', PAIRS), disable_tqdm=True)
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=2e-5)
    assert [g[1] for g in got] == [w[1] for w in want]
  # the cases differ: a boundary bug could not hide behind equal scores
  assert len({round(w[0], 3) for w in want}) == len(want)


def test_greedy_means_every_continuation_token_is_the_argmax(model):
  """The model's own three greedy tokens after a context are greedy; the same first token
  followed by two others is not (one greedy token is not enough)."""
  import jax
  import ml_collections
  from moejax.evaluate.harness import MoejaxLM
  from moejax.model.transformer import Transformer
  _, work = model
  lm = MoejaxLM(work, batch_size=2)
  apply = jax.jit(Transformer(ml_collections.FrozenConfigDict(lm.config.model),
                              train=False).apply)
  row = lm.tok_encode('def main(')
  for _ in range(3):
    row.append(int(np.argmax(np.asarray(apply(lm.scorer.variables, np.asarray([row]))[0])[0, -1])))
  ctx, best = row[:-3], row[-3:]
  other = [best[0], (best[1] + 1) % 320, (best[2] + 1) % 320]
  got = lm._loglikelihood_tokens([(('', ''), ctx, best), (('', ''), ctx, other)])
  assert [g[1] for g in got] == [True, False]


def test_loglikelihoods_equal_lm_evals_hf_backend_on_the_same_model(model):
  """lm-eval's own `hf` backend on the transformers model moejax imported: the same
  continuations' log-likelihoods (1e-4), greedy flags, rolling log-likelihoods, and greedy
  generations cut at their stop strings."""
  from lm_eval.models.huggingface import HFLM
  from moejax.evaluate.harness import MoejaxLM
  hf_dir, work = model
  ref = HFLM(pretrained=hf_dir, device='cpu', batch_size=2, dtype='float32', max_length=256)
  ours = MoejaxLM(work, batch_size=2)
  assert ours.prefix_token_id == ref.prefix_token_id == 319
  reqs = _requests('loglikelihood', PAIRS)
  want, got = ref.loglikelihood(reqs, disable_tqdm=True), ours.loglikelihood(reqs, True)
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-4)
  assert [g[1] for g in got] == [w[1] for w in want]
  texts = [(t['text'],) for t in TEXTS] + [('y = 2\n' * 120,)]  # the last spans 2 windows
  rolling = _requests('loglikelihood_rolling', texts)
  np.testing.assert_allclose(ours.loglikelihood_rolling(rolling, True),
                             ref.loglikelihood_rolling(rolling, True), rtol=1e-4)
  gen = _requests('generate_until', [('def main(', {'until': ['\n'], 'max_gen_toks': 6}),
                                     ('Größe = ', {'until': [')', 'e'], 'max_gen_toks': 8}),
                                     ('import', {'until': ['never'], 'max_gen_toks': 4}),
                                     # longer than the model reads: its newest 252 tokens
                                     ('x = 1\n' * 150, {'until': ['never'], 'max_gen_toks': 4})])
  texts = ours.generate_until(gen, True)
  assert texts == ref.generate_until(gen, True) and all(texts), texts
  # Two stop strings found at different places: the text ends before the earlier one (as
  # lm-eval cuts: at each stop string in turn). Checked on moejax's own full text, since a stop
  # inside a multi-byte character decodes differently once the tokens after it are cut off.
  long = {'until': ['never'], 'max_gen_toks': 16}
  whole, = ours.generate_until(_requests('generate_until', [('def f(', long)]), True)
  first = {}
  for i, ch in enumerate(whole):
    if ch.isascii() and not ch.isspace():
      first.setdefault(ch, i)
  (i, a), (j, b) = sorted((v, k) for k, v in first.items())[:2]
  two = _requests('generate_until', [('def f(', {**long, 'until': [b, a]})])
  assert ours.generate_until(two, True) == [whole[:i]] and i < j


@pytest.mark.slow  # a compile per bucket length, and greedy decoding per generation prompt
def test_command_evaluates_local_tasks_and_writes_json(model, tasks, capsys):
  """The three request kinds through the command, on local task files; accuracy is the share
  of documents whose answer has the highest log-likelihood (by hand from the scores)."""
  _, work = model
  out = os.path.join(work, 'eval', 'mine.json')
  assert main([f'--workdir={work}', '--tasks=tiny_choice,tiny_rolling,tiny_generate',
               f'--include_path={tasks}', '--bootstrap_iters=0', f'--output={out}']) == 0
  printed = capsys.readouterr().out
  assert 'tiny_choice' in printed and 'tiny_rolling' in printed and out in printed
  results = json.load(open(out))['results']
  scores = _by_hand(work, [(d['question'], ' ' + c) for d in CHOICE for c in d['choices']])
  k, right = 0, 0
  for d in CHOICE:
    lps = [s[0] for s in scores[k:k + len(d['choices'])]]
    right += int(np.argmax(lps)) == d['answer']
    k += len(d['choices'])
  assert results['tiny_choice']['acc,none'] == pytest.approx(right / len(CHOICE))
  assert np.isfinite(results['tiny_rolling']['word_perplexity,none'])
  assert 0 <= results['tiny_generate']['exact_match,none'] <= 1
  default = main([f'--workdir={work}', '--tasks=tiny_choice', f'--include_path={tasks}',
                  '--bootstrap_iters=0', '--limit=2'])
  assert default == 0 and os.path.exists(os.path.join(work, 'eval', 'lm_eval_step_0.json'))
  capsys.readouterr()
  # Task errors (lm-eval indexes its thousands of task files for each): a misspelt name, a
  # local task whose file is absent, a task of lm-eval's own whose data is not on this
  # machine (nothing is downloaded).
  _one_line(capsys, [f'--workdir={work}', '--tasks=tiny_choise', f'--include_path={tasks}'],
            "no task 'tiny_choise'", 'did you mean tiny_choice')
  _one_line(capsys, [f'--workdir={work}', '--tasks=tiny_missing', f'--include_path={tasks}'],
            'tiny_missing: its data could not be read', 'nothing is downloaded here')
  _one_line(capsys, [f'--workdir={work}', '--tasks=hellaswag'],
            'hellaswag: its data could not be read', 'datasets')


def _one_line(capsys, argv, *expected):
  assert main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: '), err
  for text in expected:
    assert text in err[0], (text, err[0])


def test_user_errors_are_one_line_before_the_model_loads(model, tasks, capsys, tmp_path,
                                                         monkeypatch):
  """Arguments and the lm-eval install (task errors: the slow command test)."""
  _, work = model
  _one_line(capsys, [f'--workdir={tmp_path / "nothing"}', '--tasks=tiny_choice'], 'no such run')
  _one_line(capsys, [f'--workdir={work}', '--tasks=tiny_choice', '--include_path=/no/folder'],
            '--include_path=/no/folder: no such folder')
  _one_line(capsys, [f'--workdir={work}', '--tasks= , '], 'give at least one task')
  _one_line(capsys, [f'--workdir={work}', '--tasks=x', '--batch_size=0'], '--batch_size=0')
  monkeypatch.setitem(__import__('sys').modules, 'lm_eval', None)
  _one_line(capsys, [f'--workdir={work}', '--tasks=tiny_choice'], "pip install 'moejax[eval]'")
