"""Experiment 5: capacity factor (token dropping) vs dropless dispatch.

Top-2 of 8 experts; capacity C = ceil(factor * K * T / N) per expert over the batch's T tokens,
first choices served before second choices; evaluation uses the same factor. Expert FLOPs
include the padding of the [N, C] buffers, relative to the K * T rows dropless computes.
"""
from moejax.experiments.common import SMOKE, TASKS, base
from moejax.experiments.metrics import tail_mean

from moejax.experiment import Experiment
from moejax.moe.dispatch.capacity import expert_capacity


def expert_flops_vs_dropless(rows, config):
  m, t = config.model.moe, config.train.batch_size * config.data.seq_len
  if m.dispatch.name in ('dropless', 'auto'):
    return 1.0
  c = expert_capacity(t, m.num_experts_per_tok, m.num_experts, m.dispatch.capacity_factor,
                      m.dispatch.min_capacity)
  return m.num_experts * c / (m.num_experts_per_tok * t)


def capacity(factor):
  return {'model.moe.dispatch.name': 'capacity', 'model.moe.dispatch.capacity_factor': factor,
          'model.moe.dispatch.eval_capacity_factor': factor}


def get_experiment():
  return Experiment(
      name='Capacity factor vs dropless',
      base=base(),
      arms={'cf_0.5': capacity(0.5), 'cf_1.0': capacity(1.0), 'cf_1.25': capacity(1.25),
            'cf_2.0': capacity(2.0), 'dropless': {}},
      columns={'train dropped': tail_mean('moe/dropped_fraction'),
               'expert FLOPs vs dropless': expert_flops_vs_dropless},
      baseline='dropless',
      smoke=SMOKE,
      tasks=TASKS,
      note="""Switch Transformer (Fedus et al., 2021) trains well at factors 1.0-1.25 and finds
higher factors help quality a little at a cost in compute and memory; GShard used 2.0 with
top-2. MegaBlocks (Gale et al., 2022) shows dropless routing matching or beating every capacity
factor at equal steps.""")
