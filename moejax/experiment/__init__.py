"""Experiments: named arms (config overrides) x seeds, each a normal training run, then a report.

    python -m moejax.experiment experiments/balancing.py --workdir=runs/balancing [--smoke]

runner.py runs the arms and seeds (resumable); report.py writes results.md and the plots.
"""
from moejax.experiment.runner import (Arm, Experiment, experiment_path, load_experiment,
                                      load_module, override_base, post_evaluate, run, run_config,
                                      summarize_run)

from moejax.experiment.command import main

__all__ = ['main', 'Arm', 'Experiment', 'experiment_path', 'load_experiment', 'load_module',
           'override_base', 'post_evaluate', 'run', 'run_config', 'summarize_run']
