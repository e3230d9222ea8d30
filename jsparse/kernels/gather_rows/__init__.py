"""Row gather with zero fill: the token moves of the routed FFN (``jnp.take`` rows, as a Pallas kernel)."""
