"""Evaluations of frozen features: k-NN, linear probe, and per-slot analysis of SPARO encodings."""
