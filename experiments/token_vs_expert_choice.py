"""Experiment 1: token choice vs expert choice vs expert-threshold routing at equal expected
active compute, on a compute ladder (causal LM).

Token choice: top-2 of 8 experts (dropless, the Switch loss 1e-2: the baseline). Expert choice:
each expert takes C = T * 2 / 8 tokens of the batch (routing scope 'batch'), so a token uses 2
experts on average. It trains non-causally (an expert's choice among the batch depends on later
tokens), so it is evaluated two ways: 'val loss' routes causally (token-choice top-2 on the same
router: the honest number), the 'noncausal_eval' column as trained (the leak is the gap).
Expert-threshold routing (Sun et al. 2026): per-expert thresholds, EMAs of the score quantile
that gives each expert its share, aimed at 2 experts per token (at most 4), causal in training
and decoding, no auxiliary loss. Rungs r0-r3 double the compute each (width and steps,
common.CPU_LADDER); `:tpu` is the accelerator preset.
"""
from moejax.experiment import Experiment, PostEval
from moejax.experiments.common import SMOKE, TASKS, preset
from moejax.experiments.metrics import tail_mean

EC = {'model.moe.router.name': 'expert_choice', 'model.moe.router.ec_capacity_factor': 2.0,
      'model.moe.router.ec_scope': 'batch', 'model.moe.balance.aux_loss_weight': 0.0}
ET = {'model.moe.router.name': 'expert_threshold', 'model.moe.router.threshold_target': 2.0,
      'model.moe.num_experts_per_tok': 4, 'model.moe.balance.aux_loss_weight': 0.0}


def get_experiment(arg=None):
  base, rungs = preset(arg)
  return Experiment(
      name='Token choice vs expert choice vs expert threshold (causal LM, compute ladder)',
      base=base,
      arms={'token_choice_top2': {}, 'expert_choice': EC, 'expert_threshold': ET},
      seeds=(0, 1, 2, 3, 4),
      rungs=rungs,
      baseline='token_choice_top2',
      delta=0.01,
      columns={'train loss': tail_mean('train/ce_loss')},
      post_evals={'noncausal_eval': PostEval({'model.moe.router.ec_eval': 'expert_choice'},
                                             arms=('expert_choice',))},
      smoke=SMOKE,
      tasks=TASKS,
      note="""Zhou et al. (2022) report expert choice beating token choice (GShard top-2,
Switch) in perplexity and convergence speed, in an encoder-decoder setting where routing over
the batch is allowed. On a causal LM the choice of an expert depends on later tokens, so the
training loss can profit from the future; evaluated causally that benefit is gone (OLMoE,
Muennighoff et al. 2024, found token choice better for a causal LM). Sun et al. (2026,
"Expert Threshold Routing") report 0.067 lower cross-entropy than token choice at 2.4B
parameters on FineWeb-Edu, with EMA thresholds that keep expert choice's balance and variable
compute while staying causal; one run per setting, no seeds.""")
