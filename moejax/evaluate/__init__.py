"""Downstream evaluation with EleutherAI's lm-evaluation-harness: `scoring` (a checkpoint as a
scorer of token rows), `harness` (moejax as an lm-eval model), `python -m moejax.evaluate`."""
