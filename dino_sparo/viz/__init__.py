"""Attention visualisation: which image regions each SPARO slot (and each head of the last block) attends to."""
