"""The flags that join a multi-controller run (JAX's jax.distributed: every host runs the same
command), shared by python -m moejax.main and hf import."""
from __future__ import annotations

from moejax.errors import ConfigError


def add_distributed_args(p):
  """The flags that join a multi-controller run (python -m moejax.main, hf import)."""
  p.add_argument('--distributed', action='store_true', help='join the other hosts with '
                 'jax.distributed.initialize() auto-detection')
  p.add_argument('--coordinator', default='', help='HOST:PORT of process 0 (explicit setup)')
  p.add_argument('--num_processes', type=int, default=0, help='processes in the run')
  p.add_argument('--process_id', type=int, default=-1, help='this process (0..N-1)')


def init_distributed(args):
  """Join the multi-controller run before any JAX computation, if asked to."""
  if not (args.distributed or args.coordinator):
    return
  import jax
  # CPU hosts reduce across processes through gloo; GPU/TPU use their own collectives.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if args.coordinator:
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
      raise ConfigError(f'--coordinator={args.coordinator} needs --num_processes >= 1 and '
                        f'0 <= --process_id < --num_processes (got {args.num_processes}, '
                        f'{args.process_id})')
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
  else:
    jax.distributed.initialize()
