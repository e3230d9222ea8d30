"""Grouped GEMMs over row tiles of a group-sorted, tile-padded token layout (the routed FFN's kernels).

api.py: public ``grouped_matmul`` / ``grouped_matmul_t`` (dispatch); reference.py: the pure-jnp spec; pallas.py: the
Mosaic GPU (sm90, wgmma, warp-specialised) kernels.
"""
