"""moejax: Mixture-of-Experts language models in JAX/Flax."""
import glob as _glob
import os as _os

# What this package tells libtpu on a host without a TPU (compile/chips.py sets the target's).
NO_TPU_ACCELERATOR_TYPE = 'v5p-8'


def _quiet_libtpu_without_a_tpu():
  """With the tpu extra installed (libtpu: TPU programs compiled on this host), jax looks for a
  TPU when it starts and libtpu prints errors on a host that has none. A host without TPU
  device files (a TPU VM has /dev/accel* or /dev/vfio) says so to libtpu; a TPU VM, and any
  setting already made, is left as it is."""
  if _glob.glob('/dev/accel*') or _os.path.exists('/dev/vfio'):
    return
  _os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  _os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  _os.environ.setdefault('TPU_ACCELERATOR_TYPE', NO_TPU_ACCELERATOR_TYPE)


_quiet_libtpu_without_a_tpu()
