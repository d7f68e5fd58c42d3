"""Experiment 2: load balancing on a compute ladder: the auxiliary loss vs the loss-free bias
(sign rule) vs quantile balancing vs none.

The same top-2-of-8 softmax router in every arm; the Switch/GShard auxiliary loss at 1e-2 (the
baseline), the aux-loss-free selection bias with the sign rule at rate 1e-2 (Wang et al. 2024;
DeepSeek-V3), quantile balancing (the bias moved halfway each step toward the per-expert score
quantiles that give each expert its share), and no balancing at all. The z-loss (1e-3) is in
every arm. Rungs r0-r3 double the compute each (common.CPU_LADDER); `:tpu` is the accelerator
preset.
"""
from moejax.experiment import Experiment
from moejax.experiments.common import SMOKE, TASKS, preset
from moejax.experiments.metrics import tail_mean

NO_AUX = {'model.moe.balance.aux_loss_weight': 0.0}


def get_experiment(arg=None):
  base, rungs = preset(arg)
  return Experiment(
      name='Balancing: aux loss vs loss-free bias vs quantile balancing vs none (compute ladder)',
      base=base,
      arms={'aux_1e-2': {'model.moe.balance.aux_loss_weight': 1e-2},
            'loss_free_1e-2': {**NO_AUX, 'model.moe.balance.bias_update_rate': 1e-2},
            'quantile_0.5': {**NO_AUX, 'model.moe.balance.bias_update_rate': 0.5,
                             'model.moe.balance.bias_update': 'quantile'},
            'none': NO_AUX},
      seeds=(0, 1, 2, 3, 4),
      rungs=rungs,
      baseline='aux_1e-2',
      delta=0.01,
      columns={'MaxVio batch (last 5 logs)': tail_mean('moe/max_vio'),
               'aux loss': tail_mean('moe/aux_loss')},
      smoke=SMOKE,
      tasks=TASKS,
      note="""Wang et al. (2024, "Auxiliary-loss-free load balancing") report the loss-free bias
reaching MaxVio_global about 0.04 where an auxiliary loss leaves 0.5-0.7, at equal or better
perplexity (9.50 vs 9.56 at 1B), and a larger aux weight trading quality for balance.
DeepSeek-V3 keeps only a tiny sequence-wise loss next to the bias. Quantile balancing is
Megatron-Core's and Marin's recipe. The "routing topology is quality-neutral" line of work
(arXiv 2604.14419) argues, with equivalence tests, that such routing choices leave language
modeling quality unchanged within a margin.""")
