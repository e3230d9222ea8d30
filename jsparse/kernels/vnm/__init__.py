"""V:N:M (Venom) selection: mask, prune, and the column-block choice (api.py), reference and Pallas kernels."""
