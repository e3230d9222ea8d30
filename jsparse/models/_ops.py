"""The ops the models call, behind one seam: 2:4 GEMM dispatch, remat policies, activation storage.

* :func:`matmul` -- every GEMM of the FFNs, with the operand that is 2:4 along the contraction axis named. The
  models build their 2:4 operands exactly (squared-ReLU 2:4, soft threshold, reused mask), so the XLA product of such
  an operand *is* ``a @ b``; a named operand goes to :func:`jsparse.sparse_matmul` (cuSPARSELt when it can run).
* :func:`remat_policy` -- :func:`jsparse.remat_policy`'s names (``"save_dense"``, ``"compressed"``, ``"offload"``,
  ``"recompute"``), plus any ready-made ``jax.checkpoint_policies`` attribute (``"dots_saveable"``, ...).
* :func:`op_implementation` / :func:`gemm_implementation` -- how an FFN's ``implementation`` maps onto the sparsify
  ops (``None``/``"pallas"``/``"xla"``) and onto the GEMM (``"xla"`` unless ``"cusparselt"`` is asked for).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

import jsparse
from jsparse import remat as remat_lib

# Checkpoint names of the FFN's large intermediates (what a remat policy may save, offload or compress). The FFN
# names are the remat plug-in's, so its policies apply to these modules unchanged.
FFN_HIDDEN = remat_lib.FFN_HIDDEN                  # y1 = x @ W1, T x F
FFN_ACT = remat_lib.FFN_ACT                        # r = relu(y1) (2:4-masked in the recipe), T x F, stored dense
FFN_ACT_COMPRESSED = remat_lib.FFN_ACT_COMPRESSED  # r packed (2:4 or bitmask)
FFN_OUT = "ffn_out"                                # FFN output, T x D
CHECKPOINT_NAMES = (FFN_HIDDEN, FFN_ACT, FFN_ACT_COMPRESSED, FFN_OUT)
FFN_REMAT_POLICIES = remat_lib.REMAT_POLICIES      # the names whose residual storage the FFNs implement


def matmul(a: jax.Array, b: jax.Array, *, sparse_operand: str | None = None,
           implementation: str | None = None) -> jax.Array:
  """``a @ b`` where ``sparse_operand`` ("a", "b" or None) is exactly 2:4 along the contraction axis.

  ``None`` operand or ``implementation="xla"``: ``jnp.matmul`` (the operand already is 2:4, so the reference's
  pruning would be the identity). Otherwise :func:`jsparse.sparse_matmul` with ``implementation`` (``None``: cuSPARSELt
  where it runs, its XLA path elsewhere; ``"cusparselt"``: raises where it cannot run).
  """
  if sparse_operand is None or implementation == "xla":
    return jnp.matmul(a, b)
  return jsparse.sparse_matmul(a, b, sparse_operand=sparse_operand, implementation=implementation)


def op_implementation(implementation: str | None) -> str | None:
  """The ``implementation=`` for the sparsify ops (nm_prune, squared_relu_nm, soft_threshold_24)."""
  return {None: None, "pallas": "pallas", "xla": "xla", "cusparselt": None}[implementation]


def gemm_implementation(implementation: str | None) -> str | None:
  """The ``implementation=`` for the 2:4 GEMM."""
  # "pallas" = jsparse's Pallas sparsify kernels with XLA GEMMs (the 2:4 operands as dense arrays with zeros). None
  # picks that too: inside the FFN's fwd+bwd the cuSPARSELt route (per-call compression of T x F operands, the
  # transposed backward operands) measured slower than XLA on the H100 (benchmarks/results/ffn.json, 0.23-0.77x).
  return {None: "xla", "pallas": "xla", "xla": "xla", "cusparselt": "cusparselt"}[implementation]


def remat_policy(name: str) -> Callable[..., bool]:
  """The checkpoint policy called ``name``.

  Raises:
    ValueError: unknown name.
  """
  if name in FFN_REMAT_POLICIES:
    return jsparse.remat_policy(name)
  policies = jax.checkpoint_policies
  policy = getattr(policies, name, None)
  # Factories (save_only_these_names, ...) need arguments: only ready-made policies are accepted by name.
  if policy is None or name.startswith(("save_", "checkpoint_", "_")):
    known = list(FFN_REMAT_POLICIES) + sorted(n for n in vars(policies) if not n.startswith(("save_", "checkpoint_",
                                                                                             "_")))
    raise ValueError(f"remat_policy: unknown policy {name!r}; known: {known}")
  return policy


def checkpoint(fn: Callable, policy_name: str | None) -> Callable:
  """``fn`` wrapped in ``jax.checkpoint`` with the named policy (``fn`` itself for ``None``)."""
  if policy_name is None:
    return fn
  return jax.checkpoint(fn, policy=remat_policy(policy_name))
