"""Experiment 7: sparse upcycling. A dense model trains for the first half of the steps; its
checkpoint becomes a MoE (moejax.upcycle) that trains for the second half. Compared with the
dense model continued for the same steps and a MoE trained from scratch for all of them.

- 'upcycled_copy': 8 experts, each a copy of the dense FFN (width 256), top-2 renormalised:
  at the switch it computes the dense model exactly; active FFN width doubles (512).
- 'upcycled_slice': 8 experts of width 64 cut from the dense FFN (4 slices, each used twice),
  top-4: same active width as the dense model (256), function not preserved.
- 'moe_scratch_copy_shape': the 'upcycled_copy' architecture trained from step 0.
"""
from moejax.experiments.common import SMOKE, TASKS, base

from moejax.experiment import Arm, Experiment

# MoE after the first (dense) layer; the dense model has the same shapes otherwise.
COPY = {'model.moe.num_experts': 8, 'model.moe.expert_ffn_dim': 256,
        'model.moe.num_experts_per_tok': 2, 'model.moe.router.norm_topk_prob': True}
SLICE = {'model.moe.num_experts': 8, 'model.moe.expert_ffn_dim': 64,
         'model.moe.num_experts_per_tok': 4, 'model.moe.router.norm_topk_prob': True}


def get_experiment():
  return Experiment(
      name='Sparse upcycling',
      base=base(),
      arms={'dense': {'model.first_k_dense': 4},
            'upcycled_copy': Arm(COPY, upcycle_from='dense', upcycle_at=0.5),
            'upcycled_slice': Arm(SLICE, upcycle_from='dense', upcycle_at=0.5,
                                  upcycle_mode='slice'),
            'moe_scratch_copy_shape': COPY},
      baseline='dense',
      smoke=SMOKE,
      tasks=TASKS,
      note="""Komatsuzaki et al. (2022, "Sparse Upcycling") find upcycled models beat their
dense parents continued for the same extra compute, and beat MoE models trained from scratch
unless the scratch model gets a large share of the original budget.""")
