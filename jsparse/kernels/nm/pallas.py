"""Pallas GPU kernels for the N:M ops. (Placeholder until the kernels land: nothing is supported yet.)"""

from __future__ import annotations

_NOT_YET = "the Pallas N:M kernels are not built yet"


def supports_nm(x_RxK, n, m):
  return False, _NOT_YET


def supports_transposable(x_BxRxC):
  return False, _NOT_YET


def nm_prune(x_RxK, n, m, *, interpret=False):
  raise NotImplementedError(_NOT_YET)


def soft_threshold_24(w_RxK, *, interpret=False):
  raise NotImplementedError(_NOT_YET)


def transposable_24_mask(x_BxRxC, *, interpret=False):
  raise NotImplementedError(_NOT_YET)
