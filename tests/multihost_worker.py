"""One process of the two-process test in test_multihost.py (not collected by pytest).

python tests/multihost_worker.py PROCESS_ID PORT WORKDIR: 4 CPU devices per process, joined by
jax.distributed over localhost with gloo collectives, trains the tiny config to WORKDIR.
"""
import os
import sys

os.environ['XLA_FLAGS'] = ('--xla_force_host_platform_device_count=4 '
                           '--xla_backend_optimization_level=0 '
                           '--xla_llvm_disable_expensive_passes=true')
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402

jax.config.update('jax_cpu_collectives_implementation', 'gloo')


def main():
  process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
  jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2,
                             process_id=process_id)
  assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from multihost_config import config
  from moejax.training.loop import train
  train(config(), workdir)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()
