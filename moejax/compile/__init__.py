"""Compiling for the hardware moejax targets, from a CPU machine: XLA's TPU compiler on
compile-only devices of a real topology (chips.py), the collectives read from the optimized HLO
(hlo.py), the programs and their memory (program.py), a roofline report (report.py) and a search
over meshes, remat, dispatch and batch (search.py). The command: python -m moejax.compile."""
