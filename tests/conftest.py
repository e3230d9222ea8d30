"""Test configuration: GPU-only tests (marker ``gpu``) skip without a CUDA GPU."""

import jax
import pytest


def _has_gpu() -> bool:
  try:
    return jax.default_backend() == "gpu"
  except Exception:
    return False


def pytest_collection_modifyitems(config, items):
  if _has_gpu():
    return
  skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
