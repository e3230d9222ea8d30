"""Pallas GPU kernel for V:N:M selection. (Placeholder until the kernel lands: nothing is supported yet.)"""

from __future__ import annotations

_NOT_YET = "the Pallas V:N:M kernel is not built yet"


def supports_vnm(x_RxC, v, n, m):
  return False, _NOT_YET


def vnm_prune(x_RxC, v, n, m, *, interpret=False):
  raise NotImplementedError(_NOT_YET)
