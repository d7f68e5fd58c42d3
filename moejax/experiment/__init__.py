"""Experiments: named arms (config overrides) x seeds, optionally x the rungs of a compute
ladder, each a normal training run, then a report.

    python -m moejax.experiment experiments/balancing.py --workdir=runs/balancing [--smoke]

spec.py says what an experiment is, runner.py runs the runs (resumable; with --until_decided,
rounds of seeds from sequential.py), tasks.py scores each run's final checkpoint on lm-eval
tasks, report.py writes results.md: pairing.py says which runs compare and how, statistics.py
the tests, verdicts and their intervals, ladder.py a ladder's section with the compute
multipliers of multipliers.py, plots.py the plots.
"""
from moejax.experiment.runner import (Arm, Experiment, PostEval, Rung, RunKey, Tasks,
                                      experiment_path, load_experiment, load_module,
                                      override_base, plan, post_evaluate, run, run_config,
                                      summarize_run)
from moejax.experiment.command import main

__all__ = ['Arm', 'Experiment', 'PostEval', 'Rung', 'RunKey', 'Tasks', 'experiment_path',
           'load_experiment', 'load_module', 'main', 'override_base', 'plan', 'post_evaluate',
           'run', 'run_config', 'summarize_run']
