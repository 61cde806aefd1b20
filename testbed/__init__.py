"""What tests/ and bench/ share: real Flower runs, stand-in grids, reference math, synthetic models, results.

Not part of the installed package. pytest puts the repository root on the path (``pythonpath`` in
pyproject.toml); benchmarks run from the root as ``python -m bench.<name>``.

``flower.py`` (a simulation SuperLink, or a local federation, and runs on it) · ``grids.py`` (in-process
and multi-process stand-ins for Flower's Grid running the real client handlers) · ``reference.py`` (the
weighted mean in plain NumPy: the oracle and the baseline) · ``synthetic_llama.py`` (Llama-3.1-70B
shapes on disk, K layers) · ``results.py`` (benchmark results with one metadata header, README blocks).
"""
