"""Experiment 1: token choice vs expert choice at equal active compute, on a causal LM.

Token choice: top-2 of 8 experts (dropless). Expert choice: each expert takes
C = T_scope * 2 / 8 tokens, so a token uses 2 experts on average (equal expert FLOPs). Expert
choice trains non-causally (an expert's choice among a scope of tokens depends on later tokens
in it); it is evaluated causally as token-choice top-2 on the same router ('val loss', the
honest number), and non-causally as it was trained ('noncausal_eval loss', which leaks). The
leakage effect is the gap between the two, with a small (one sequence, 64 tokens) and a large
(the whole batch, 1024 tokens) routing scope.
"""
from moejax.experiments.common import SMOKE, base
from moejax.experiments.metrics import tail_mean

from moejax.experiment import Experiment

EC = {'model.moe.router.name': 'expert_choice', 'model.moe.router.ec_capacity_factor': 2.0,
      'model.moe.router.ec_eval': 'topk', 'model.moe.balance.aux_loss_weight': 0.0}


def get_experiment():
  return Experiment(
      name='Token choice vs expert choice (causal LM)',
      base=base(),
      arms={'token_choice_top2': {},
            'expert_choice_sequence': {**EC, 'model.moe.router.ec_scope': 'sequence'},
            'expert_choice_batch': {**EC, 'model.moe.router.ec_scope': 'batch'}},
      columns={'train loss': tail_mean('train/ce_loss')},
      post_evals={'noncausal_eval': {'model.moe.router.ec_eval': 'expert_choice'}},
      smoke=SMOKE,
      note="""Zhou et al. (2022) report expert choice beating token choice (GShard top-2,
Switch) in perplexity and convergence speed, on an encoder-decoder/masked setting where routing
over the batch is allowed. On a causal LM the choice of an expert depends on later tokens of
the scope, so the training loss can profit from the future; the causal evaluation removes that
benefit. Expected: the larger the scope, the larger the gap between non-causal and causal
evaluation.""")
