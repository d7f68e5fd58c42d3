"""See what the router does: the routing of any checkpoint (a training run or a Hugging Face
import) over evaluation sets, as statistics, plots and a token view (python -m moejax.routes);
routing traces written and read (trace.py), and replayed in training, evaluation and
generation.

  analysis.py  statistics of a traced routing (NumPy; no model needed)
  collect.py   running a checkpoint and keeping its routing
  trace.py     the trace format (.npz), its checks, and a trace as training data
  report.py    routes.md, routes.json and the plots
  page.py      the token view (tokens.html)
"""
