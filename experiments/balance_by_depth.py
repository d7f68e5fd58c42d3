"""Experiment 3: how fast does each MoE layer balance, with and without a dense first layer?

Per-layer MaxVio (batch) over training and the step from which it stays below 0.5, for 4
layers with the first dense (3 MoE layers), all 4 MoE, and all 4 MoE without any balancing
loss (to see the natural imbalance by depth).
"""
from moejax.experiments.common import SMOKE, TASKS, base
from moejax.experiments.metrics import steps_to_balance, tail_mean

from moejax.experiment import Experiment


def get_experiment():
  return Experiment(
      name='Balance by depth',
      base=base(),
      arms={'first_layer_dense': {'model.first_k_dense': 1},
            'all_moe': {'model.first_k_dense': 0},
            'all_moe_no_aux': {'model.first_k_dense': 0,
                               'model.moe.balance.aux_loss_weight': 0.0}},
      columns={'steps to MaxVio<0.5 per layer': steps_to_balance(0.5),
               'final MaxVio per layer': tail_mean('moe/per_layer/max_vio')},
      baseline='first_layer_dense',
      smoke=SMOKE,
      tasks=TASKS,
      note="""DeepSeekMoE (Dai et al., 2024) keeps the first layer dense because the first
layer's load-balance state converges especially slowly. Here: does the first MoE layer reach
balance later than deeper ones, and does making layer 0 dense change that?""")
