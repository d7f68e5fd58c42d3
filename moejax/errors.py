"""The errors a command reports in one line instead of a traceback (moejax/cli: exit code 2 for
a user error, 3 for a diverged run, 4 for a preempted one). Imports nothing from moejax, so any room may raise them."""


class ConfigError(ValueError):
  """A config field, flag or file holds something moejax cannot run with. The message names
  the field (or flag, or file) and the fix."""


class Diverged(RuntimeError):
  """Training met a non-finite loss or gradient (train.nonfinite='stop', or too many skips in
  a row). The message names the step and what was (not) written."""


class Preempted(RuntimeError):
  """The run was asked to stop (SIGTERM, a scheduler's preemption notice) and saved a checkpoint
  at the step every process agreed on. The message names the step and says how to resume."""
