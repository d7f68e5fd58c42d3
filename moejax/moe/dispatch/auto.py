"""The default dispatch (dispatch.name='auto'): dropless, with the tokens travelling to the
experts whenever the experts are split over devices.

- no 'expert' mesh axis (or size 1): 'dropless', every (token, choice) pair on its expert;
- an 'expert' axis > 1 on TPU or GPU: 'ragged_all_to_all', exact-size exchanges of the routed
  pairs (moved bytes: K rows per token, only to the ranks holding its experts);
- an 'expert' axis > 1 on CPU: 'ring' (XLA:CPU has no ragged all-to-all).

With plain 'dropless' under an expert axis, GSPMD all-gathers every expert's weights onto every
device (and the batch's tokens with them): correct, but it is the opposite of what an expert
axis is for. `python -m moejax.compile` shows the difference in the collectives it reports.
The choice reads the mesh being traced (its size and platform), so the same config picks the
right path on one CPU, on 8 simulated devices and on a pod.
"""
from __future__ import annotations

import dataclasses

from moejax.moe.dispatch.base import DISPATCHERS, GROUPED_KERNEL, Dispatcher, register
from moejax.moe.types import RouterOutput
from moejax.parallel.mesh import expert_axis_in_trace, mesh_platform


def chosen_path() -> str:
  """The dispatcher 'auto' runs on the mesh being traced."""
  if expert_axis_in_trace() == 1:
    return 'dropless'
  return 'ring' if mesh_platform() == 'cpu' else 'ragged_all_to_all'


@register('auto')
@dataclasses.dataclass(frozen=True)
class AutoDispatch(Dispatcher):
  """Dropless; expert-parallel (ragged all-to-all, or the ring on CPU) when mesh.expert > 1."""
  READS = GROUPED_KERNEL

  def __call__(self, x, r: RouterOutput, experts, train: bool):
    return DISPATCHERS[chosen_path()]()(x, r, experts, train)
