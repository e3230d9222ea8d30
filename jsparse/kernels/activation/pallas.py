"""Pallas GPU kernel for fused squared-ReLU + N:M. (Placeholder until the kernel lands: nothing is supported yet.)"""

from __future__ import annotations

_NOT_YET = "the Pallas squared-ReLU N:M kernel is not built yet"


def supports(x_RxK, n, m):
  return False, _NOT_YET


def squared_relu_nm(x_RxK, n, m, *, interpret=False):
  raise NotImplementedError(_NOT_YET)
