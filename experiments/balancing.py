"""Experiment 2: load balancing strategies on the same top-2-of-8 softmax router.

No balancing; the Switch/GShard auxiliary loss at two weights; the aux-loss-free bias (Wang et
al. 2024; DeepSeek-V3) at two update rates; the sequence-wise loss alone. The z-loss (1e-3) is
the same in every arm.
"""
from moejax.experiments.common import SMOKE, base
from moejax.experiments.metrics import tail_mean

from moejax.experiment import Experiment

NO_AUX = {'model.moe.balance.aux_loss_weight': 0.0}


def get_experiment():
  return Experiment(
      name='Balancing: none vs aux loss vs loss-free bias vs sequence-wise loss',
      base=base(),
      arms={'none': NO_AUX,
            'aux_1e-2': {'model.moe.balance.aux_loss_weight': 1e-2},
            'aux_1e-1': {'model.moe.balance.aux_loss_weight': 1e-1},
            'loss_free_1e-3': {**NO_AUX, 'model.moe.balance.bias_update_rate': 1e-3},
            'loss_free_1e-2': {**NO_AUX, 'model.moe.balance.bias_update_rate': 1e-2},
            'seq_wise_1e-2': {**NO_AUX, 'model.moe.balance.seq_aux_loss_weight': 1e-2}},
      columns={'MaxVio batch (last 5 logs)': tail_mean('moe/max_vio'),
               'aux loss': tail_mean('moe/aux_loss')},
      smoke=SMOKE,
      note="""Wang et al. (2024, "Auxiliary-loss-free load balancing") report the loss-free bias
reaching MaxVio_global about 0.04 where an auxiliary loss leaves 0.5-0.7 (MaxVio_batch similar
pattern), at equal or better perplexity, and that a larger aux weight balances better but hurts
the loss. DeepSeek-V3 keeps only a tiny sequence-wise loss next to the bias.""")
