"""Kernels: one folder per op with a jnp reference, Pallas/CUDA kernels and the dispatching api."""

from jsparse.kernels._common import pallas_interpret as pallas_interpret
