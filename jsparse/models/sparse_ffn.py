"""``SparseFFN``: the squared-ReLU FFN with switchable 2:4 activation and/or S-STE weight sparsity (flax.nnx).

The parameters are the dense ``w1 (D, F)`` and ``w2 (F, D)`` in both modes, so the sparse phase can be switched on
and off between steps (``models.set_sparse``) without touching them. ``sparse`` is a static attribute: ``nnx.jit``
compiles each mode once. Non-trainable sparsity state (the S-STE scales ``beta1``/``beta2``, the permutation RNG)
lives in ``SparsityState`` / RNG variables and is checkpointed with the model.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

import jsparse
from jsparse.models import _ops
from jsparse.models import recipe as recipe_lib
from jsparse.models import stats as stats_lib
from jsparse.models.config import FFNConfig
from jsparse.models.ffn import dense_squared_relu, flatten_tokens, init_weight
from jsparse.models.sste import sste_beta, sste_weight

DEFAULT_CONFIG = FFNConfig(kind="sparse", activation_sparsity="2:4")


class SparsityState(nnx.Variable):
  """Sparsity state that is saved with the model but never optimised (S-STE beta, later router centroids)."""


def _dense_stats(x_TxD, w1_DxF, *, activation_24: bool, op_impl) -> dict[str, jax.Array]:
  """The statistics of the dense mode (not differentiated; XLA shares ``x W1`` with the FFN's own product)."""
  y1_TxF = jax.lax.stop_gradient(x_TxD @ w1_DxF)
  r_TxF = jnp.maximum(y1_TxF.astype(jnp.float32), 0.0)
  out = dict(act_density=jnp.mean((r_TxF > 0).astype(jnp.float32)), dropped_mass=jnp.zeros((), jnp.float32),
             dense_features=jnp.asarray(w1_DxF.shape[1], jnp.float32))
  if activation_24:
    # What the 2:4 mask would drop if the sparse phase started now.
    _, mask_TxF = jsparse.squared_relu_nm(y1_TxF, 2, 4, return_mask=True, implementation=op_impl)
    mass_TxF = r_TxF * r_TxF
    total = jnp.sum(mass_TxF)
    out["dropped_mass"] = jnp.sum(jnp.where(mask_TxF, 0.0, mass_TxF)) / jnp.where(total > 0, total, 1.0)
  return out


class SparseFFN(nnx.Module):
  """Squared-ReLU FFN with 2:4 activation sparsity (Haziza et al.) and/or 2:4 S-STE weights (Hu et al.).

  With the config's sparsity off (or ``sparse=False``) it computes exactly :class:`SquaredReLUFFN`.

  Args:
    d_model, d_ff: D and F (F a multiple of 4 for 2:4 activations, D for S-STE on W1).
    config: an :class:`FFNConfig` with ``kind="sparse"`` (default: the 2:4 activation recipe).
    dtype: compute dtype (``None``: the input's dtype).
    param_dtype: parameter dtype.
    rngs: ``nnx.Rngs``; ``params`` draws the weights, ``permute`` (or the default stream) the token permutations.

  With ``permutation="random"`` each call draws a permutation from the module's RNG stream, i.e. updates module
  state: differentiate it with flax's transforms (``nnx.grad``, ``nnx.value_and_grad``, ``nnx.jit``), not with a bare
  ``jax.grad`` around ``nnx.merge`` (flax refuses the state update there); ``permutation="fixed"`` has no state.

  With ``activation_sparsity="vnm"`` the module also holds the router state (centroids, neuron permutation, group
  sizes, step counter) as ``SparsityState`` variables: clustered from the initial W1 at construction, re-clustered
  from the current W1 by ``prepare_sparse_phase`` and every ``recluster_every`` optimizer steps by
  :meth:`after_optimizer_step`. The sparse forward is :func:`jsparse.routed_ffn` (grouped GEMMs on a GPU).

  **Weight layout of the routed FFN.** By default ``w1``/``w2`` stay in their original neuron order and the forward
  gathers them into router order every step (and the gradients back). After :meth:`group_weights` (or
  ``models.prepare_sparse_phase(model, tokens, optimizer)``) the module *stores* them in router order -- W1's columns
  and W2's rows permuted together, with the optimizer's moments, which leaves the FFN's function and an element-wise
  optimizer's trajectory unchanged -- its router permutation becomes the identity, and the forward runs
  ``routed_ffn(..., weights_grouped=True)`` (no per-step weight gathers). Every later re-clustering then permutes the
  weights and moments again, so :meth:`after_optimizer_step` needs the moments (``models.after_optimizer_step(model,
  optimizer)``). ``weights_grouped`` is a static attribute (part of the graph definition, like ``sparse``).

  Raises:
    ValueError: a config that is not ``kind="sparse"`` or sizes that 2:4 / the router cannot use.
  """

  def __init__(self, d_model: int, d_ff: int, config: FFNConfig = DEFAULT_CONFIG, *, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if not isinstance(config, FFNConfig) or config.kind != "sparse":
      raise ValueError(f"SparseFFN: config must be an FFNConfig with kind='sparse', got {config!r}")
    if config.activation_sparsity == "vnm":
      config.router_config().group_size(d_ff)  # F must split into E groups of a multiple of router_block
    if config.activation_24 and d_ff % 4:
      raise ValueError(f"SparseFFN: d_ff={d_ff} must be a multiple of 4 for 2:4 activations")
    if config.sparse_w1 and d_model % 4:
      raise ValueError(f"SparseFFN: d_model={d_model} must be a multiple of 4 for 2:4 S-STE on w1")
    if config.sparse_w2 and d_ff % 4:
      raise ValueError(f"SparseFFN: d_ff={d_ff} must be a multiple of 4 for 2:4 S-STE on w2")
    self.d_model, self.d_ff = d_model, d_ff
    self.config = config
    self.dtype = dtype
    self.sparse = bool(config.sparse)
    # Same draws, same order as SquaredReLUFFN: one seed gives one set of starting weights for both.
    self.w1 = init_weight(rngs, (d_model, d_ff), d_model ** -0.5, param_dtype)
    self.w2 = init_weight(rngs, (d_ff, d_model), d_ff ** -0.5, param_dtype)
    op_impl = _ops.op_implementation(config.implementation)
    self.beta1 = SparsityState(sste_beta(self.w1[...], 0, op_impl)) if config.sparse_w1 else None
    self.beta2 = SparsityState(sste_beta(self.w2[...], 0, op_impl)) if config.sparse_w2 else None
    self.weights_grouped = False  # static: w1/w2 stored in router order (see group_weights)
    self.collect_stats = True  # static: sow the statistics (when config.stats); see models.set_stats
    if self._routed:
      self._set_router(jsparse.router_init(self.w1[...], config.router_config(), jax.random.key(config.router_seed)))
    if self._permutes and config.permutation == "random":
      # A stream of its own: "permute" if the caller made one, else a fork of the default (or params) stream.
      name = next((n for n in ("permute", "default", "params") if n in rngs), None)
      if name is None:
        raise ValueError("SparseFFN: permutation='random' needs an RNG stream ('permute', 'default' or 'params')")
      self.permute_rng = rngs[name].fork()
    else:
      self.permute_rng = None

  @property
  def _permutes(self) -> bool:
    return self.config.permute_tokens and self.config.weight_grads_24 and not self._routed

  @property
  def _routed(self) -> bool:
    return self.config.activation_sparsity == "vnm"

  def _set_router(self, state) -> None:
    fields = dict(router_centroids=state.centroids_ExD, router_perm=state.perm_F, router_sizes=state.group_sizes_E,
                  router_step=state.step)
    for name, value in fields.items():
      if hasattr(self, name):
        getattr(self, name)[...] = value
      else:
        setattr(self, name, SparsityState(value))

  def router_state(self):
    """The :class:`jsparse.RouterState` of a ``"vnm"`` FFN (``None`` otherwise)."""
    if not self._routed:
      return None
    return jsparse.RouterState(self.router_centroids[...], self.router_perm[...], self.router_sizes[...],
                               self.router_step[...])

  def after_optimizer_step(self, moments_w1: Sequence[nnx.Variable] | None = None,
                           moments_w2: Sequence[nnx.Variable] | None = None) -> None:
    """Router bookkeeping once per optimizer step: counts steps, re-clusters every ``recluster_every`` (jittable).

    With the weights stored in router order (:meth:`group_weights`), a re-clustering also permutes w1, w2 and the
    optimizer moments given here (variables shaped like w1 / like w2; ``models.after_optimizer_step(model,
    optimizer)`` finds them), inside one ``lax.cond``, so the layout stays grouped.

    Raises:
      ValueError: weights stored in router order, re-clustering configured, and no moments given (``None``; pass
        empty lists for an optimizer without moments).
    """
    if not (self._routed and self.sparse):
      return
    rcfg = self.config.router_config()
    if not self.weights_grouped:
      self._set_router(jsparse.router_update(self.router_state(), self.w1[...], rcfg))
      return
    state = self.router_state()
    state = dataclasses.replace(state, step=state.step + 1)
    if rcfg.recluster_every == 0:
      self._set_router(state)
      return
    if moments_w1 is None or moments_w2 is None:
      raise ValueError("SparseFFN.after_optimizer_step: the weights are stored in router order, so a re-clustering "
                       "must also permute the optimizer's moments; call models.after_optimizer_step(model, optimizer)")

    def recluster(operands):
      st, w1, w2, m1, m2 = operands
      st, perm_F = jsparse.settle_permutation(jsparse.router_recluster(st, w1, rcfg))
      take = functools.partial(jsparse.take_neurons, perm_F=perm_F)
      return st, take(w1, axis=1), take(w2, axis=0), [take(a, axis=1) for a in m1], [take(a, axis=0) for a in m2]

    operands = (state, self.w1[...], self.w2[...], [v[...] for v in moments_w1], [v[...] for v in moments_w2])
    state, w1, w2, m1, m2 = jax.lax.cond(state.step % rcfg.recluster_every == 0, recluster, lambda o: o, operands)
    self._set_router(state)
    self.w1[...], self.w2[...] = w1, w2
    for var, value in zip([*moments_w1, *moments_w2], [*m1, *m2]):
      var[...] = value

  def group_weights(self, moments_w1: Sequence[nnx.Variable] = (), moments_w2: Sequence[nnx.Variable] = ()) -> None:
    """Stores w1/w2 in router order from now on (a ``"vnm"`` FFN; see the class docstring).

    Permutes W1's columns and W2's rows (and the given optimizer moments, shaped like w1 / like w2) by the router's
    permutation, sets the permutation to the identity and switches the forward to ``weights_grouped=True``. The
    FFN computes the same function (up to float summation order). Idempotent; call outside ``jit`` (it changes the
    static graph: re-split the model afterwards).

    Raises:
      ValueError: the FFN is not routed, or a moment's shape matches neither weight.
    """
    if not self._routed:
      raise ValueError("SparseFFN.group_weights: only a routed (activation_sparsity='vnm') FFN has a router order")
    for name, moments in (("w1", moments_w1), ("w2", moments_w2)):
      shape = getattr(self, name).shape
      for var in moments:
        if var.shape != shape:
          raise ValueError(f"SparseFFN.group_weights: a {name} moment has shape {var.shape}, expected {shape}")
    settled, perm_F = jsparse.settle_permutation(self.router_state())
    for var, axis in [(self.w1, 1), (self.w2, 0), *[(v, 1) for v in moments_w1], *[(v, 0) for v in moments_w2]]:
      var[...] = jsparse.take_neurons(var[...], perm_F, axis)
    self._set_router(settled)
    self.weights_grouped = True

  def prepare_sparse_phase(self, moments_w1: Sequence[nnx.Variable] | None = None,
                           moments_w2: Sequence[nnx.Variable] | None = None) -> None:
    """Fixes the S-STE scales and re-clusters the router from the current weights (call once, when the sparse phase
    starts). Routed FFN: with the optimizer moments given, also stores the weights in router order
    (:meth:`group_weights`).

    Raises:
      ValueError: the weights are already stored in router order and no moments are given (the new clustering
        could not be laid out).
    """
    if self._routed:
      self._set_router(jsparse.router_recluster(self.router_state(), self.w1[...], self.config.router_config()))
      if moments_w1 is not None and moments_w2 is not None:
        self.group_weights(moments_w1, moments_w2)
      elif self.weights_grouped:
        raise ValueError("SparseFFN.prepare_sparse_phase: the weights are stored in router order; pass the optimizer "
                         "(models.prepare_sparse_phase(model, tokens, optimizer)) to lay out the new clustering")
    op_impl = _ops.op_implementation(self.config.implementation)
    if self.beta1 is not None:
      self.beta1[...] = sste_beta(self.w1[...], 0, op_impl)
    if self.beta2 is not None:
      self.beta2[...] = sste_beta(self.w2[...], 0, op_impl)

  def _permutation(self, T: int) -> jax.Array:
    cfg = self.config
    key = jax.random.key(cfg.permutation_seed) if cfg.permutation == "fixed" else self.permute_rng()
    return jax.random.permutation(key, T).astype(jnp.int32)

  def forward_weights(self, dtype=None) -> tuple[jax.Array, jax.Array]:
    """The weights the forward GEMMs use in the current mode (``beta * S(W)`` for S-STE), in ``dtype``."""
    cfg = self.config
    w1, w2 = self.w1[...], self.w2[...]
    if self.sparse:
      op_impl = _ops.op_implementation(cfg.implementation)
      if cfg.sparse_w1:
        w1 = sste_weight(w1, self.beta1[...], 0, op_impl)
      if cfg.sparse_w2:
        w2 = sste_weight(w2, self.beta2[...], 0, op_impl)
    dtype = dtype or w1.dtype
    return w1.astype(dtype), w2.astype(dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """``(..., D) -> (..., D)`` in the compute dtype; sows the statistics when ``config.stats`` and
    ``collect_stats`` (:func:`jsparse.models.set_stats`)."""
    cfg = self.config
    want_stats = cfg.stats and self.collect_stats
    x_TxD, shape = flatten_tokens(x, self.d_model, "SparseFFN")
    dtype = self.dtype or x.dtype
    x_TxD = x_TxD.astype(dtype)
    w1_DxF, w2_FxD = self.forward_weights(dtype)
    if self.sparse and self._routed:
      out_TxD, stats = self._routed_forward(x_TxD, w1_DxF, w2_FxD)
    elif self.sparse and cfg.has_sparsity:
      spec = recipe_lib.RecipeSpec.from_config(cfg, stats=want_stats)
      perm_T = self._permutation(x_TxD.shape[0]) if self._permutes else None
      core = _ops.checkpoint(functools.partial(recipe_lib.sparse_ffn, spec=spec), cfg.remat)
      out_TxD, stats = core(x_TxD, w1_DxF, w2_FxD, perm_T=perm_T)
    else:
      # Exactly SquaredReLUFFN's computation; the statistics are a separate, undifferentiated reduction.
      out_TxD = dense_squared_relu(x_TxD, w1_DxF, w2_FxD, remat=cfg.remat, capacity=cfg.remat_capacity)
      stats = _dense_stats(x_TxD, w1_DxF, activation_24=cfg.activation_24,
                           op_impl=_ops.op_implementation(cfg.implementation)) if want_stats else {}
    for name, value in stats.items():
      stats_lib.sow(self, name, value)
    return out_TxD.reshape(shape)

  def _routed_forward(self, x_TxD, w1_DxF, w2_FxD):
    cfg = self.config
    rcfg = cfg.router_config()
    state = jax.lax.stop_gradient(self.router_state())
    groups_T = jsparse.route_tokens(x_TxD, state, rcfg)
    impl = {None: None, "pallas": "pallas", "xla": "xla", "cusparselt": None}[cfg.implementation]

    def core(x_TxD, w1_DxF, w2_FxD):
      return jsparse.routed_ffn(x_TxD, w1_DxF, w2_FxD, state, rcfg, groups=groups_T, vnm=cfg.vnm_blocks,
                                weights_grouped=self.weights_grouped, implementation=impl)

    out_TxD = _ops.checkpoint(core, cfg.remat)(x_TxD, w1_DxF, w2_FxD)
    stats = {}
    if cfg.stats and self.collect_stats:
      # Diagnostics at the cost of one extra (undifferentiated) dense x @ W1: what the routing drops.
      x_sg, w1_sg = jax.lax.stop_gradient(x_TxD), jax.lax.stop_gradient(w1_DxF)
      r_TxF = jnp.maximum((x_sg @ w1_sg).astype(jnp.float32), 0.0)
      stats = dict(act_density=jnp.mean((r_TxF > 0).astype(jnp.float32)),
                   dropped_mass=1.0 - jsparse.captured_mass(x_sg, w1_sg, state, groups_T),
                   dense_features=jnp.zeros((), jnp.float32))
    return out_TxD, stats
