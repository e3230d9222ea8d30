"""Shared test helpers: the one tolerance table, and the implementation parametrisation.

Every kernel suite is parametrised over ``IMPLEMENTATIONS``: the XLA reference itself, the Pallas kernel in interpret
mode (runs on CPU), and the Pallas kernel on the GPU (marker ``gpu``; skipped without one). The GPU class and its
interpret twin are therefore the same tests.
"""

from __future__ import annotations

import contextlib

import jax.numpy as jnp
import numpy as np
import pytest

import jsparse

# One tolerance table per dtype, for comparisons of *computed* values (selections are compared exactly).
TOLERANCES = {
    jnp.dtype(jnp.float32): dict(rtol=1e-5, atol=1e-6),
    jnp.dtype(jnp.float16): dict(rtol=2e-3, atol=1e-3),
    jnp.dtype(jnp.bfloat16): dict(rtol=1.6e-2, atol=1e-2),
}

FLOAT_DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]

IMPLEMENTATIONS = [
    "xla",
    "interpret",
    pytest.param("gpu", marks=pytest.mark.gpu),
]


@contextlib.contextmanager
def implementation(name: str):
  """Yields the ``implementation=`` value for a parametrised case, inside interpret mode when needed."""
  if name == "xla":
    yield "xla"
  elif name == "interpret":
    with jsparse.pallas_interpret():
      yield "pallas"
  elif name == "gpu":
    yield "pallas"
  elif name == "cuda":  # ops with CUDA kernels of their own (the bitmask packer), GPU only
    yield "cuda"
  else:
    raise ValueError(name)


def assert_close(actual, expected, dtype=None):
  dtype = jnp.dtype(dtype or jnp.result_type(expected))
  tol = TOLERANCES[dtype]
  np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32), **tol)


def assert_bitwise_equal(actual, expected):
  a, e = np.asarray(actual), np.asarray(expected)
  assert a.shape == e.shape and a.dtype == e.dtype, (a.shape, a.dtype, e.shape, e.dtype)
  if a.dtype.kind == "f" or a.dtype.name in ("bfloat16", "float16"):
    a = a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)
    e = e.view(np.uint16 if e.dtype.itemsize == 2 else np.uint32)
  np.testing.assert_array_equal(a, e)
