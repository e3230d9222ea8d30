"""Compressed rematerialisation of the squared-ReLU FFN activation, and the remat-policy plug-in.

The FFN ``out = relu(x @ w1)**2 @ w2`` needs, in its backward pass, ``r = relu(y1)`` (for ``dy1 = 2 r dh``) and
``h = r**2`` (for ``dw2 = h^T g``). ``h`` is recomputed from ``r`` bit for bit, and ``x @ w1``'s own residuals are the
layer inputs, so saving ``r`` alone is enough -- and ``r`` of a squared-ReLU FFN is 85-98% zeros. This module saves it
either dense, compressed (bitmask + packed non-zeros, :func:`jsparse.pack_bitmask`), offloaded to host memory
compressed, or not at all (recompute ``x @ w1``), chosen by one string:

==============  ============================================  ===============================================
``remat``       saved for the backward pass (per FFN)           backward pass does
==============  ============================================  ===============================================
"save_dense"    ``r`` dense, name :data:`FFN_ACT`               ``h = r*r``
"compressed"    ``r`` packed, name :data:`FFN_ACT_COMPRESSED`   unpack ``r`` and ``h`` (one fused pass)
"offload"       the packed ``r`` in pinned host memory          copy it back, unpack
"recompute"     nothing of size T x F                           ``y1 = x @ w1`` again, then ``r`` and ``h``
==============  ============================================  ===============================================

The names are the interface (MaxText's convention): the forward pass tags ``y1`` :data:`FFN_HIDDEN`, the dense
``r`` :data:`FFN_ACT` and the packed one :data:`FFN_ACT_COMPRESSED`, and :func:`remat_policy` maps each string to a
``jax.checkpoint`` policy over those names, usable with ``jax.checkpoint(policy=...)`` and ``flax.nnx.remat``.

Gradient exactness: every policy gives the same gradients bit for bit, because the backward pass sees exactly the
``r`` the forward computed with. If the compressed buffer overflows (``capacity`` too small for the activation's
density), the forward pass itself computes with the stored values (the dropped ones count as zero in ``h``), so the
gradient stays exact for the function computed, and ``dropped_fraction`` (``return_stats=True``) says how much was
dropped. ``capacity`` (a fraction of the T x F elements) is the knob: set it above the density you expect.

What each policy saves (``jax.ad_checkpoint.print_saved_residuals`` of ``jnp.sum(squared_relu_ffn(x, w1, w2,
remat=..., capacity=0.25))`` with x bf16[256,64], w1 bf16[64,512], w2 bf16[512,64]; JAX 0.10.2, CPU)::

  plain jnp autodiff  bool[256,512] (relu mask), bf16[256,512] x 3 (relu, square, 2*relu) + the arguments
  save_dense          bf16[256,512] named 'ffn_act'                      + the arguments
  compressed          u32[256,16] named 'ffn_act_compressed'   (bitmask: 1/16 of bf16 dense)
                      bf16[32768] named 'ffn_act_compressed'    (values: capacity 0.25 x 256 x 512)
                      i32[256] named 'ffn_act_compressed'       (row offsets)
                      f32[] named 'ffn_act_compressed'          (non-zero count)  + the arguments
  offload             u32<host>[256,16], bf16<host>[32768], i32<host>[256], f32<host>[]
                      output of device_put                      + the arguments
  recompute           the arguments only

``docs/remat.md`` has the verbatim output; ``benchmarks/remat.py`` (section ``residuals``) regenerates it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jsparse import formats
from jsparse.kernels import _common as common
from jsparse.kernels.activation import api as activation_api
from jsparse.kernels.compress import api as compress_api
from jsparse.kernels.compress import format as compress_format
from jsparse.kernels.compress import reference as compress_ref

FFN_HIDDEN = "ffn_hidden"
"""Name of the FFN pre-activation ``y1 = x @ w1`` (T x F)."""
FFN_ACT = "ffn_act"
"""Name of the dense activation ``r = relu(y1)`` saved by ``"save_dense"`` (T x F)."""
FFN_ACT_COMPRESSED = "ffn_act_compressed"
"""Name of the compressed activation (every leaf of the stored pytree) saved by ``"compressed"``/``"offload"``."""
REMAT_NAMES = (FFN_HIDDEN, FFN_ACT, FFN_ACT_COMPRESSED)
REMAT_POLICIES = ("save_dense", "recompute", "compressed", "offload")
STORAGE_KINDS = ("dense", "bitmask", "24", "vnm")


# ----------------------------------------------------------------------------------------------------------------------
# Policies


def remat_policy(name: str):
  """The ``jax.checkpoint`` policy for a remat string.

  Args:
    name: ``"save_dense"`` (save :data:`FFN_ACT`), ``"compressed"`` (save :data:`FFN_ACT_COMPRESSED`),
      ``"offload"`` (move :data:`FFN_ACT_COMPRESSED` to pinned host memory, bring it back for the backward pass) or
      ``"recompute"`` (save nothing).

  Returns:
    A policy for ``jax.checkpoint(fn, policy=...)`` / ``flax.nnx.remat(fn, policy=...)``. It saves *only* the FFN
    names, so everything else inside the checkpointed function is recomputed; combine it with another policy through
    ``jax.checkpoint_policies.save_from_both_policies``.

  Raises:
    ValueError: unknown name.
  """
  policies = jax.checkpoint_policies
  if name == "save_dense":
    return policies.save_only_these_names(FFN_ACT)
  if name == "compressed":
    return policies.save_only_these_names(FFN_ACT_COMPRESSED)
  if name == "offload":
    return policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[FFN_ACT_COMPRESSED], offload_src="device",
        offload_dst="pinned_host")
  if name == "recompute":
    return policies.nothing_saveable
  raise ValueError(f"remat_policy: name must be one of {REMAT_POLICIES}, got {name!r}")


def saved_residuals(fn, *args, **kwargs) -> list[tuple[Any, str]]:
  """``(aval, source)`` of every residual ``jax.grad(fn)`` saves -- what ``print_saved_residuals`` prints.

  JAX keeps the list form private (``jax._src.ad_checkpoint.saved_residuals``, in 0.10 and 0.11); this is the one
  place jsparse reaches for it, so tests and benchmarks can assert sizes instead of parsing printed text.
  """
  from jax._src import ad_checkpoint as _ad_checkpoint  # pylint: disable=g-import-not-at-top
  return list(_ad_checkpoint.saved_residuals(fn, *args, **kwargs))


def residual_bytes(fn, *args, include_arguments: bool = False, **kwargs) -> int:
  """Bytes of the residuals ``jax.grad(fn)`` saves (by default not counting ``fn``'s own arguments)."""
  total = 0
  for aval, source in saved_residuals(fn, *args, **kwargs):
    if include_arguments or "from the argument" not in source:
      total += aval.size * aval.dtype.itemsize
  return total


# ----------------------------------------------------------------------------------------------------------------------
# Store / load: the API for ops with their own custom_vjp (e.g. models.SparseFFN)


def store_activation(r: jax.Array, *, kind: str = "bitmask", capacity: float | int = 0.25, v: int = 64, n: int = 2,
                     m: int = 8, implementation: str | None = None):
  """Packs an activation for the backward pass and tags it with its remat name.

  Call it in a ``custom_vjp`` forward rule and return the result as (part of) the residuals; call
  :func:`load_activation` in the backward rule. Under ``jax.checkpoint(policy=remat_policy(...))`` the tag decides
  whether the residual is saved, offloaded or recomputed.

  Args:
    r: the activation, shape ``(..., F)``.
    kind: ``"bitmask"`` (any sparsity; exact unless ``capacity`` overflows -- see :func:`jsparse.pack_bitmask`),
      ``"24"`` (2:4 values + 2-bit indices, 9/16 of dense; exact when ``r`` has at most 2 non-zeros per group of 4
      along the last axis, e.g. from :func:`jsparse.squared_relu_nm`), ``"vnm"`` (V:N:M, 2-D ``r``; exact when ``r``
      already has that pattern, e.g. from :func:`jsparse.vnm_prune`) or ``"dense"`` (no compression, tag only).
    capacity: the bitmask's values buffer (fraction of ``r.size`` or element count).
    v, n, m: the V:N:M pattern for ``kind="vnm"``.
    implementation: ``None``, ``"cuda"``, ``"pallas"`` or ``"xla"`` (bitmask kernels).

  Returns:
    The stored pytree: ``r`` itself (``"dense"``, named :data:`FFN_ACT`), or a :class:`jsparse.BitmaskPacked` /
    :class:`jsparse.Sparse24` / :class:`jsparse.VNMPacked` whose leaves are named :data:`FFN_ACT_COMPRESSED`.

  Raises:
    ValueError: unknown ``kind``, or an ``r`` the format cannot hold (see the formats' own checks).
  """
  if kind == "dense":
    return checkpoint_name(r, FFN_ACT)
  if kind == "bitmask":
    stored = compress_api.pack_bitmask(r, capacity, implementation=implementation)
  elif kind == "24":
    stored = formats.pack_24(r)
  elif kind == "vnm":
    stored = formats.pack_vnm(r, v, n, m)
  else:
    raise ValueError(f"store_activation: kind must be one of {STORAGE_KINDS}, got {kind!r}")
  return checkpoint_name(stored, FFN_ACT_COMPRESSED)


def load_activation(stored, *, return_square: bool = False, implementation: str | None = None):
  """The dense activation of a :func:`store_activation` result (and, with ``return_square``, its square).

  Args:
    stored: what :func:`store_activation` returned.
    return_square: also return ``r*r`` (float32 product rounded to ``r.dtype``); fused into the bitmask unpack.
    implementation: ``None``, ``"cuda"``, ``"pallas"`` or ``"xla"`` (bitmask kernels).

  Returns:
    ``r``, or ``(r, r*r)``.
  """
  if isinstance(stored, compress_format.BitmaskPacked):
    return compress_api.unpack_bitmask(stored, return_square=return_square, implementation=implementation)
  if isinstance(stored, formats.Sparse24):
    r = formats.unpack_24(stored)
  elif isinstance(stored, formats.VNMPacked):
    r = formats.unpack_vnm(stored)
  elif isinstance(stored, jax.Array) or hasattr(stored, "shape"):
    r = stored
  else:
    raise ValueError(f"load_activation: stored must come from store_activation, got {type(stored).__name__}")
  return (r, compress_ref.square(r)) if return_square else r


# ----------------------------------------------------------------------------------------------------------------------
# The squared-ReLU FFN core


@dataclasses.dataclass(frozen=True)
class _Spec:
  store: str  # "dense" or "bitmask"
  capacity: int  # values-buffer elements (bitmask)
  nm: tuple[int, int] | None
  implementation: str | None


def _activation_forward(y1: jax.Array, spec: _Spec):
  """Returns ``(stored, h, stats)``: what the backward pass gets and the h the forward multiplies by w2."""
  if spec.nm is None:
    source, relu = y1, True
  else:  # Haziza's 2:4 activation: keep the n largest pre-activations of every m, then relu.
    # "cuda" names the bitmask kernels; the N:M selection has none of its own and takes its default.
    select_impl = None if spec.implementation == "cuda" else spec.implementation
    _, mask = activation_api.squared_relu_nm(y1, *spec.nm, return_mask=True, implementation=select_impl)
    source, relu = jnp.where(mask, compress_ref.activation(y1, True), jnp.zeros((), y1.dtype)), False
  if spec.store == "dense":
    r = compress_ref.activation(source, relu)
    h = compress_ref.square(r)
    density = jnp.mean((r != 0).astype(jnp.float32))
    return r, h, dict(density=density, dropped_fraction=jnp.zeros((), jnp.float32))
  stored, h = compress_api.pack_bitmask(source, spec.capacity, relu=relu, return_square=True,
                                        implementation=spec.implementation)
  return stored, h, dict(density=stored.density, dropped_fraction=stored.dropped_fraction)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _core(y1_TxF: jax.Array, w2_FxD: jax.Array, spec: _Spec):
  _, h_TxF, stats = _activation_forward(y1_TxF, spec)
  return h_TxF @ w2_FxD, stats


def _core_fwd(y1_TxF, w2_FxD, spec):
  stored, h_TxF, stats = _activation_forward(y1_TxF, spec)
  name = FFN_ACT if spec.store == "dense" else FFN_ACT_COMPRESSED
  return (h_TxF @ w2_FxD, stats), (checkpoint_name(stored, name), w2_FxD)


def _core_bwd(spec, res, cts):
  stored, w2_FxD = res
  g_TxD, _ = cts
  r_TxF, h_TxF = load_activation(stored, return_square=True, implementation=spec.implementation)
  dh_TxF = g_TxD @ w2_FxD.T
  # h = r*r (r = 0 wherever relu or the pattern cut), so dh/dy1 = 2 r: one product, rounded once.
  dy1_TxF = (2.0 * r_TxF.astype(jnp.float32) * dh_TxF.astype(jnp.float32)).astype(r_TxF.dtype)
  return dy1_TxF, (h_TxF.T @ g_TxD).astype(w2_FxD.dtype)


_core.defvjp(_core_fwd, _core_bwd)


def _ffn(x_TxD: jax.Array, w1_DxF: jax.Array, w2_FxD: jax.Array, spec: _Spec):
  y1_TxF = checkpoint_name(x_TxD @ w1_DxF, FFN_HIDDEN)
  return _core(y1_TxF, w2_FxD, spec)


# ----------------------------------------------------------------------------------------------------------------------
# remat="auto": jax.custom_remat (JAX >= 0.11 with jax_remat3) reads the enclosing checkpoint's policy.


def custom_remat_available() -> bool:
  """Whether ``remat="auto"`` can run: ``jax.custom_remat`` exists and ``jax_remat3`` is switched on."""
  return hasattr(jax, "custom_remat") and bool(getattr(jax.config, "jax_remat3", False))


def _store_for_policy(policy) -> str | None:
  """The residual form an enclosing policy asks for: "bitmask", "dense" or None (recompute)."""
  policies = jax.checkpoint_policies
  names: set[str] = set()
  for attr in ("saveable_names", "names_which_can_be_saved", "names_which_can_be_offloaded"):
    names |= set(getattr(policy, attr, ()) or ())
  if isinstance(policy, getattr(policies, "SaveAnyNamesButThese", ())):
    names |= set(REMAT_NAMES) - set(policy.names)
  if FFN_ACT_COMPRESSED in names:
    return "bitmask"
  if FFN_ACT in names:
    return "dense"
  return None


def _auto_f(x_TxD, w1_DxF, w2_FxD, spec):
  y1_TxF = checkpoint_name(x_TxD @ w1_DxF, FFN_HIDDEN)
  _, h_TxF, stats = _activation_forward(y1_TxF, dataclasses.replace(spec, store="dense"))
  return h_TxF @ w2_FxD, stats


def _auto_fwd(policy, x_TxD, w1_DxF, w2_FxD, spec):
  store = _store_for_policy(policy)
  y1_TxF = checkpoint_name(x_TxD @ w1_DxF, FFN_HIDDEN)
  stored, h_TxF, stats = _activation_forward(y1_TxF, dataclasses.replace(spec, store=store or "dense"))
  res = None if store is None else checkpoint_name(stored, FFN_ACT if store == "dense" else FFN_ACT_COMPRESSED)
  offload = FFN_ACT_COMPRESSED in (getattr(policy, "names_which_can_be_offloaded", ()) or ())
  if res is not None and offload:
    # custom_remat residuals bypass the policy's offload step (JAX 0.11.2), so move them ourselves.
    res = _OffloadedResidual(jax.device_put(res, jax.memory.Space.Host))
  return (h_TxF @ w2_FxD, stats), res


@jax.tree_util.register_pytree_node_class
class _OffloadedResidual:
  """Marks a residual that ``_auto_fwd`` moved to host memory (a pytree wrapper, so it flows through JAX)."""

  def __init__(self, stored):
    self.stored = stored

  def tree_flatten(self):
    return (self.stored,), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    return cls(children[0])


def _auto_rem(res, x_TxD, w1_DxF, w2_FxD, spec):
  if res is None:  # nothing saved: recompute y1 (the "recompute" policy, or any policy that names nothing of ours)
    stored, _, stats = _activation_forward(x_TxD @ w1_DxF, dataclasses.replace(spec, store="dense"))
  else:
    stored, stats = res, None
    if isinstance(stored, _OffloadedResidual):
      stored = jax.device_put(stored.stored, jax.memory.Space.Device)
  r_TxF, h_TxF = load_activation(stored, return_square=True, implementation=spec.implementation)
  if stats is None:
    stats = dict(density=jnp.mean((r_TxF != 0).astype(jnp.float32)), dropped_fraction=jnp.zeros((), jnp.float32))
  return (h_TxF @ w2_FxD, stats), (r_TxF, h_TxF, x_TxD, w1_DxF, w2_FxD)


def _auto_bwd(res2, cts):
  r_TxF, h_TxF, x_TxD, w1_DxF, w2_FxD = res2
  g_TxD, _ = cts
  dh_TxF = g_TxD @ w2_FxD.T
  dy1_TxF = (2.0 * r_TxF.astype(jnp.float32) * dh_TxF.astype(jnp.float32)).astype(r_TxF.dtype)
  return dy1_TxF @ w1_DxF.T, x_TxD.T @ dy1_TxF, (h_TxF.T @ g_TxD).astype(w2_FxD.dtype)


@functools.cache
def _auto_ffn(spec: _Spec):
  # One custom_remat per (static) spec, closed over: JAX 0.11.2's custom_remat static_argnums mis-counts leaves.
  return jax.custom_remat(functools.partial(_auto_f, spec=spec),
                          lambda policy, *args: _auto_fwd(policy, *args, spec),
                          lambda res, *args: _auto_rem(res, *args, spec), _auto_bwd)


def squared_relu_ffn(x: jax.Array, w1: jax.Array, w2: jax.Array, *, remat: str = "compressed",
                     capacity: float | int = 0.25, nm: tuple[int, int] | None = None, return_stats: bool = False,
                     implementation: str | None = None) -> Any:
  """``relu(x @ w1)**2 @ w2`` whose backward pass saves the activation as ``remat`` says (module docstring).

  The op is its own ``jax.checkpoint(policy=remat_policy(remat))``, so it behaves as asked on its own; inside a
  larger checkpointed block, give the block the same policy (``jax.checkpoint(block,
  policy=jsparse.remat_policy(remat))``) so the saved activation survives the outer remat too.

  Args:
    x: ``(..., D)`` tokens. w1: ``(D, F)``. w2: ``(F, D_out)``. One floating dtype for all three.
    remat: ``"compressed"`` (default), ``"save_dense"``, ``"offload"`` or ``"recompute"``; or ``"auto"``: follow
      the enclosing ``jax.checkpoint``'s policy (whichever of :data:`FFN_ACT_COMPRESSED` / :data:`FFN_ACT` it
      saves or offloads; recompute if neither) through ``jax.custom_remat`` -- JAX >= 0.11 with
      ``jax.config.update("jax_remat3", True)``, and only inside a ``jax.checkpoint`` (JAX 0.11.2 raises
      NotImplementedError for ``jax.grad`` of a custom_remat outside one, or under ``everything_saveable``).
      Without differentiation "auto" computes the plain FFN (no capacity drop).
    capacity: for ``"compressed"``/``"offload"``: the packed buffer as a fraction of T x F (the activation density
      it holds without dropping; 1.0 never drops) or an element count. Memory is ``T F (1/16 + capacity)`` of a
      16-bit dense activation.
    nm: ``(n, m)`` for Haziza et al.'s N:M activation (keep the n largest pre-activations of every m features before
      the squared ReLU; gradient masked by the same pattern), or ``None`` for the plain squared ReLU.
    return_stats: also return ``{"density", "dropped_fraction"}`` (float32 scalars): the activation's non-zero
      fraction and the fraction of its non-zeros that did not fit in ``capacity`` (0 unless it overflowed).
    implementation: ``None``, ``"cuda"``, ``"pallas"`` or ``"xla"`` for the pack/unpack kernels (and, except
      ``"cuda"``, the N:M selection's).

  Returns:
    ``out`` of shape ``(..., D_out)``, or ``(out, stats)`` with ``return_stats``.

  Raises:
    ValueError: bad shapes/dtypes, unknown ``remat``, F not a multiple of 32 (compressed) or of m (nm), bad
      ``capacity``.
  """
  op = "squared_relu_ffn"
  for name, a in (("x", x), ("w1", w1), ("w2", w2)):
    common.check_floating(op, name, a)
  common.check_rank(op, "x", x, 1)
  common.check_rank(op, "w1", w1, 2, 2)
  common.check_rank(op, "w2", w2, 2, 2)
  D, F = w1.shape
  if x.shape[-1] != D or w2.shape[0] != F:
    raise ValueError(f"{op}: shapes do not chain: x{tuple(x.shape)} @ w1{tuple(w1.shape)} @ w2{tuple(w2.shape)}")
  if len({jnp.dtype(a.dtype) for a in (x, w1, w2)}) > 1:
    raise ValueError(f"{op}: x, w1 and w2 must share one dtype, got {x.dtype}, {w1.dtype}, {w2.dtype}")
  if remat not in REMAT_POLICIES + ("auto",):
    raise ValueError(f"{op}: remat must be one of {REMAT_POLICIES + ('auto',)}, got {remat!r}")
  if remat == "auto" and not custom_remat_available():
    raise ValueError(f"{op}: remat='auto' needs jax.custom_remat with jax_remat3=True (JAX >= 0.11); this JAX "
                     f"{'has it off' if hasattr(jax, 'custom_remat') else 'lacks it'}: pass remat='compressed' etc.")
  if nm is not None:
    common.check_nm(op, *nm)
    common.check_multiple(op, "F (w1 axis 1)", F, nm[1], "m")
  store = "dense" if remat in ("save_dense", "recompute") else "bitmask"  # "auto": decided per policy
  T = x.size // D
  elements = 0
  if store == "bitmask" or remat == "auto":
    common.check_multiple(op, "F (w1 axis 1)", F, compress_format.WORD_BITS, "word bits")
    elements = compress_format.capacity_elements(op, (T, F), capacity)
  spec = _Spec(store, elements, None if nm is None else tuple(nm), implementation)
  if remat == "auto":
    out, stats = _auto_ffn(spec)(x.reshape(T, D), w1, w2)
  else:
    fn = jax.checkpoint(functools.partial(_ffn, spec=spec), policy=remat_policy(remat))
    out, stats = fn(x.reshape(T, D), w1, w2)
  out = out.reshape(*x.shape[:-1], w2.shape[1])
  return (out, stats) if return_stats else out
