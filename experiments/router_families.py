"""Experiment 4: router families at equal total and active parameters (DeepSeekMoE's Table 1
design, in miniature). Every FFN has active width 256; every MoE layer has 2048 expert widths
in total: hash top-1 and Switch top-1 use 8 experts of 256, GShard top-2 16 of 128,
DeepSeekMoE 1 shared + 31 routed experts of 64 with top-3 routed.
"""
from moejax.experiments.common import SMOKE, TASKS, base
from moejax.experiments.metrics import tail_mean

from moejax.experiment import Experiment

TOP1 = {'model.moe.num_experts': 8, 'model.moe.expert_ffn_dim': 256,
        'model.moe.num_experts_per_tok': 1}


def get_experiment():
  return Experiment(
      name='Router families at equal active parameters',
      base=base(),
      arms={'dense': {'model.first_k_dense': 4},
            'hash_top1': {**TOP1, 'model.moe.router.name': 'hash',
                          'model.moe.balance.aux_loss_weight': 0.0,
                          'model.moe.balance.z_loss_weight': 0.0},
            # Switch: the gate is the softmax probability itself (not renormalised to 1).
            'switch_top1': {**TOP1, 'model.moe.router.norm_topk_prob': False},
            'gshard_top2': {'model.moe.num_experts': 16, 'model.moe.expert_ffn_dim': 128,
                            'model.moe.num_experts_per_tok': 2},
            'deepseekmoe': {'model.moe.num_experts': 31, 'model.moe.expert_ffn_dim': 64,
                            'model.moe.num_experts_per_tok': 3,
                            'model.moe.num_shared_experts': 1,
                            'model.moe.router.norm_topk_prob': False}},
      columns={'train loss': tail_mean('train/ce_loss')},
      baseline='dense',
      smoke=SMOKE,
      tasks=TASKS,
      note="""DeepSeekMoE (Dai et al., 2024), 2B total parameters, Pile loss: dense 2.060, hash
1.932, Switch 1.881, GShard 1.867, DeepSeekMoE 1.808 (lower is better).""")
