"""Bitmask + packed non-zeros: the compressed form of a sparse activation saved for the backward pass (remat)."""
