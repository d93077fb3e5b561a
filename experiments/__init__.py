"""Experiments run against the package (not part of it): ``python -m experiments.<name>`` from the repository root."""
