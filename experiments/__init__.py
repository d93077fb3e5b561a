"""Experiments run against the package (not part of it): ``python -m experiments.<study>`` from the repository root.
Each study is one module; what they share (data sets, training runs and their cache, evaluations, report cells) is
in :mod:`experiments.base`, and no study imports another."""
