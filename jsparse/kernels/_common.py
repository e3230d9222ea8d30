"""Shared plumbing for every op: implementation dispatch, interpret mode, input checks.

Every public op takes ``implementation``:

* ``None``   -- best available: the Pallas kernel on a GPU when it supports the input, the XLA reference elsewhere.
* ``"pallas"`` -- the Pallas kernel; raises if it cannot run here (it never silently falls back).
* ``"xla"``  -- the pure-``jnp`` reference (the spec, the CPU path and the test oracle).

Ops with more backends (``"cusparselt"``, ``"mosaic"``) document them where they are defined.

Pallas kernels run on a CPU only in interpret mode, switched on for a block with :func:`pallas_interpret`. The flag is
read at trace time, so trace (or call an un-jitted op) inside the block.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp

_state = threading.local()

IMPLEMENTATIONS = (None, "pallas", "xla")


@contextlib.contextmanager
def pallas_interpret(enabled: bool = True) -> Iterator[None]:
  """Runs jsparse's Pallas kernels in interpret mode inside the block (what the CPU test twins use)."""
  previous = getattr(_state, "interpret", False)
  _state.interpret = enabled
  try:
    yield
  finally:
    _state.interpret = previous


def interpret_enabled() -> bool:
  """Whether :func:`pallas_interpret` is active in this thread."""
  return getattr(_state, "interpret", False)


@functools.cache
def on_gpu() -> bool:
  """True when JAX's default backend is a CUDA GPU."""
  try:
    return jax.default_backend() == "gpu" and "cuda" in jax.devices()[0].client.platform_version.lower()
  except Exception:  # pragma: no cover - exotic backends
    return jax.default_backend() == "gpu"


def mosaic_interpret_params(interpret: bool):
  """``interpret=`` for ``plgpu.kernel``: Pallas' Mosaic GPU interpreter parameters, or None to compile."""
  if not interpret:
    return None
  from jax.experimental.pallas import mosaic_gpu as plgpu
  cls = getattr(plgpu, "InterpretGPUParams", None)  # exported from JAX 0.11
  if cls is None:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as cls  # JAX 0.10
  return cls()


def pallas_runnable() -> bool:
  """Pallas GPU kernels can run here: on a CUDA GPU, or anywhere in interpret mode."""
  return interpret_enabled() or on_gpu()


def resolve_implementation(op: str, implementation: str | None, *, pallas_supports: bool = True,
                           why_not: str = "") -> str:
  """Turns the user's ``implementation`` into ``"pallas"`` or ``"xla"``.

  Args:
    op: the op's name, for error messages.
    implementation: ``None``, ``"pallas"`` or ``"xla"``.
    pallas_supports: whether the kernel supports this particular input (shape, dtype, block sizes).
    why_not: the reason when it does not, for the error raised on an explicit ``"pallas"``.

  Raises:
    ValueError: unknown implementation, or ``"pallas"`` requested where it cannot run.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{op}: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation == "xla":
    return "xla"
  if implementation == "pallas":
    if not pallas_runnable():
      raise ValueError(f"{op}: implementation='pallas' needs a CUDA GPU (or jsparse.kernels.pallas_interpret() "
                       f"on a CPU); the default backend here is {jax.default_backend()!r}")
    if not pallas_supports:
      raise ValueError(f"{op}: implementation='pallas' does not support this input: {why_not}")
    return "pallas"
  return "pallas" if (on_gpu() and pallas_supports) else "xla"


# ----------------------------------------------------------------------------------------------------------------------
# Input checks. All raise one-line ValueErrors at trace time, naming the op and the argument.


def check_floating(op: str, name: str, x: jax.Array) -> None:
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{op}: {name} must have a floating dtype, got {dtype}")


def check_rank(op: str, name: str, x: jax.Array, min_rank: int, max_rank: int | None = None) -> None:
  ndim = jnp.ndim(x)
  if ndim < min_rank or (max_rank is not None and ndim > max_rank):
    want = f"at least {min_rank}" if max_rank is None else (
        f"{min_rank}" if min_rank == max_rank else f"{min_rank} to {max_rank}")
    raise ValueError(f"{op}: {name} must have rank {want}, got shape {tuple(jnp.shape(x))}")


def normalize_axis(op: str, axis: int, ndim: int) -> int:
  if not -ndim <= axis < ndim:
    raise ValueError(f"{op}: axis {axis} is out of range for rank {ndim}")
  return axis % ndim


def check_nm(op: str, n: int, m: int) -> None:
  if not (isinstance(n, int) and isinstance(m, int)):
    raise ValueError(f"{op}: n and m must be Python ints, got n={n!r}, m={m!r}")
  if m < 1 or n < 1:
    raise ValueError(f"{op}: n and m must be positive, got n={n}, m={m}")
  if n >= m:
    raise ValueError(f"{op}: n must be smaller than m, got n={n}, m={m}")


def check_multiple(op: str, what: str, size: int, multiple: int, of: str) -> None:
  if size % multiple:
    raise ValueError(f"{op}: {what} has size {size}, not a multiple of {of}={multiple}")


def check_same_shape(op: str, names: Sequence[str], *arrays: jax.Array) -> None:
  shapes = [tuple(jnp.shape(a)) for a in arrays]
  if len(set(shapes)) > 1:
    desc = ", ".join(f"{n}{s}" for n, s in zip(names, shapes))
    raise ValueError(f"{op}: shapes must match, got {desc}")


def magnitude_key(x: jax.Array) -> jax.Array:
  """|x| in float32 with NaN mapped to +inf.

  This is the ordering every selection op uses: NaN counts as larger than any number, so a NaN is always kept and
  propagates to the output instead of being silently pruned away (a NaN in training must stay visible).
  """
  a = jnp.abs(x.astype(jnp.float32))
  return jnp.where(jnp.isnan(a), jnp.inf, a)
