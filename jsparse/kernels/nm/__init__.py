"""N:M, transposable 2:4 and S-STE soft-threshold ops (api.py), their jnp reference and Pallas kernels."""
