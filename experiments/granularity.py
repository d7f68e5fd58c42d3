"""Experiment 6: expert granularity and shared experts at fixed total and active parameters.

Every MoE layer holds 1024 expert widths and activates 256: 8 x 128 top-2, 16 x 64 top-4,
32 x 32 top-8, and 1 shared + 15 routed x 64 top-3.
"""
from moejax.experiments.common import SMOKE, TASKS, base
from moejax.experiments.metrics import tail_mean

from moejax.experiment import Experiment


def moe(n, width, k, shared=0):
  return {'model.moe.num_experts': n, 'model.moe.expert_ffn_dim': width,
          'model.moe.num_experts_per_tok': k, 'model.moe.num_shared_experts': shared}


def get_experiment():
  return Experiment(
      name='Granularity and shared experts',
      base=base(),
      arms={'8x128_top2': moe(8, 128, 2), '16x64_top4': moe(16, 64, 4),
            '32x32_top8': moe(32, 32, 8), 'shared1_15x64_top3': moe(15, 64, 3, shared=1)},
      columns={'train loss': tail_mean('train/ce_loss')},
      baseline='8x128_top2',
      smoke=SMOKE,
      tasks=TASKS,
      note="""DeepSeekMoE (Dai et al., 2024) found finer experts (more, smaller, more of them
active) and shared-expert isolation both lower the loss at fixed cost. OLMoE (Muennighoff et al.,
2024) confirmed the granularity gain but found a shared expert did not help.""")
