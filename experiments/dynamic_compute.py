"""Experiment 9: routing methods of 2024-2026 against top-2 with an auxiliary loss and with the
loss-free bias, at equal mean active compute, 5 seeds.

Every arm has 8 routed experts of width 128 and about 2 of them per token on average (the
active FFN width of top-2), so the methods that vary the number of experts per token are
matched on its mean (the table's 'active experts (eval)' column shows what each reached):
- top2_aux (baseline) and top2_loss_free (sign-rule bias, no auxiliary loss): K = 2 always;
- top2_aux_per_sequence: the auxiliary loss computed per sequence, not over the global batch
  (the scope compared in arXiv:2501.11873);
- null_experts: 3 slots over 8 experts + 4 zero-computation experts (MoE++), the auxiliary
  loss balancing all 12, which holds the real experts at 3 x 8 / 12 = 2 per token on average;
- top_p: experts until their probability reaches p = 0.45 (at most 4), with the dynamic
  (entropy) loss at 1e-4 and the auxiliary loss (arXiv:2403.07652); p = 0.5 reached 2.25
  experts per token at the end in a first run of 5 seeds, hence the lower threshold;
- relu: ReLU routing (ReMoE, arXiv:2412.14711), the adaptive L1 penalty steering to 2 active
  experts per token (at most 4), no auxiliary loss.
The report gives each arm's difference from the baseline with the interval of its verdict and
Welch's t-test over the 5 seeds.
"""
from moejax.experiments.common import SMOKE, TASKS, base
from moejax.experiments.metrics import tail_mean

from moejax.experiment import Experiment

NO_AUX = {'model.moe.balance.aux_loss_weight': 0.0}
SLOTS = {'model.moe.num_experts_per_tok': 4}


def _eval(key):
  def fn(rows, config):
    vals = [r[key] for r in rows if key in r]
    return vals[-1] if vals else None
  return fn


def get_experiment():
  return Experiment(
      name='Variable compute per token at equal mean active experts',
      base=base(),
      arms={'top2_aux': {},
            'top2_loss_free': {**NO_AUX, 'model.moe.balance.bias_update_rate': 1e-2},
            'top2_aux_per_sequence': {'model.moe.balance.aux_loss_scope': 'sequence'},
            'null_experts': {'model.moe.num_experts_per_tok': 3,
                             'model.moe.router.null_experts': 4},
            'top_p': {**SLOTS, 'model.moe.router.name': 'top_p',
                      'model.moe.router.top_p': 0.45,
                      'model.moe.balance.entropy_loss_weight': 1e-4},
            'relu': {**SLOTS, **NO_AUX, 'model.moe.router.name': 'relu',
                     'model.moe.balance.l1_target': 2.0}},
      seeds=(0, 1, 2, 3, 4),
      baseline='top2_aux',
      columns={'active experts (eval)': _eval('eval/active_experts'),
               'active experts (last 5 logs)': tail_mean('moe/active_experts'),
               'dead experts (eval)': _eval('eval/dead_experts')},
      smoke=SMOKE,
      tasks=TASKS,
      note="""The papers report, at 100M-1B parameters and billions of tokens: MoE++ (zero,
copy and constant experts) better quality at lower compute than a plain top-2; top-p routing
(threshold 0.4) better downstream scores with fewer than 2 experts per token on average;
ReMoE lower loss than top-K with the same active experts, improving with more experts. At
this scale (0.7M parameters, 0.2M tokens) only large effects can show.""")
