"""The config of the kill -9 fault trial (test_fault_trial.py): the multi-host test's small
model on one device, 200 steps with a checkpoint every third, so kills land before, between and
during checkpoint writes."""
from multihost_config import get_config as _small_model


def get_config():
  c = _small_model()  # keeps the loss-free bias on: the router biases must survive restarts
  c.mesh.data, c.mesh.expert = -1, 1
  c.train.steps, c.train.warmup_steps = 200, 5
  c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 1, 30, 3
  c.train.eval_batches, c.train.keep_checkpoints = 1, 3
  return c
