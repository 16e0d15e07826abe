"""Benchmarks of lstm-harness, outside the installed package; run from the repository root.

    python -m bench           # the CPU tables: every ratio the performance goals are judged by
    python -m bench.oracles   # each oracle's cases per second
    python -m bench.gpu       # the CuPy LSTMs against cuDNN (needs a GPU)
"""
