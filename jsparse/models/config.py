"""Static configuration of the FFNs and the decoder: frozen (hashable) dataclasses, validated on construction.

Everything here is static under ``jit``: changing a field changes the compiled program. Arrays that change during
training (weights, the S-STE scale beta, the token-permutation RNG) live in the modules as ``nnx.Variable``\\ s.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jsparse.models import _ops
from jsparse.router import RouterConfig

FFN_KINDS = ("squared_relu", "swiglu", "sparse")
ACTIVATION_SPARSITY = (None, "2:4", "vnm")
WEIGHT_SPARSITY = (None, "2:4-sste")
WEIGHT_TARGETS = ("w1", "w2", "both")
IMPLEMENTATIONS = (None, "pallas", "xla", "cusparselt")
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")


def _dtype_name(op: str, field: str, value: Any) -> str:
  try:
    name = jnp.dtype(value).name
  except TypeError as e:
    raise ValueError(f"{op}: {field} must be a dtype or dtype name, got {value!r}") from e
  if not jnp.issubdtype(jnp.dtype(name), jnp.floating):
    raise ValueError(f"{op}: {field} must be a floating dtype, got {name}")
  return name


def _check_choice(op: str, field: str, value: Any, choices: tuple) -> None:
  if value not in choices:
    raise ValueError(f"{op}: {field} must be one of {choices}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class FFNConfig:
  """What one FFN computes. ``kind`` picks the module; the other fields configure ``kind="sparse"``.

  Attributes:
    kind: ``"squared_relu"`` (dense baseline), ``"swiglu"`` (dense baseline) or ``"sparse"`` (:class:`SparseFFN`).
    activation_sparsity: ``None``; ``"2:4"`` = Haziza et al.'s recipe (2:4 on y1 before relu^2, the forward mask
      reused in the backward, token permutation, token-wise 2:4 in the weight-gradient GEMMs with the densest
      features kept dense); ``"vnm"`` = the neuron-routed FFN (Madhyastha et al.): W1's neurons clustered into
      ``num_groups`` groups, each token computed on its group's neurons only (:func:`jsparse.routed_ffn`), optionally
      V:N:M-pruned inside the group (``vnm_blocks``).
    weight_sparsity: ``None`` or ``"2:4-sste"`` (S-STE soft threshold, fixed scale beta, straight-through gradient).
    weight_sparsity_on: which weights ``weight_sparsity`` applies to: ``"w1"``, ``"w2"`` or ``"both"``.
    permute_tokens: recipe ablation switch -- shuffle the tokens before the token-wise 2:4 of the weight gradients.
    permutation: ``"random"`` (a fresh permutation per call, drawn from the module's ``permute`` RNG stream, as in
      the reference code) or ``"fixed"`` (one permutation per token count, from ``permutation_seed``).
    permutation_seed: seed of the ``"fixed"`` permutation.
    reuse_mask_in_backward: recipe ablation switch -- the forward 2:4 mask also zeroes dy1 (off: dy1 uses the
      unmasked relu(y1), the ablation that diverges in the paper).
    dense_fraction: the densest fraction of features whose weight-gradient rows stay dense (the "5%" of the 95/5
      split); the sparse count is rounded up to a multiple of ``dense_multiple``.
    dense_multiple: rounding of the split (128 in the paper; tests use small values).
    token_24_weight_grads: token-wise 2:4 (with the split) in the two weight-gradient GEMMs. ``None`` = on with
      ``activation_sparsity="2:4"``, off otherwise; ``True`` also applies it in the weight-only mode.
    remat: checkpoint policy name for the FFN (``None``: no rematerialisation inside the FFN): the remat plug-in's
      ``"save_dense"``, ``"compressed"``, ``"offload"``, ``"recompute"`` (``jsparse.remat_policy``) or a ready-made
      ``jax.checkpoint_policies`` name. With ``"compressed"``/``"offload"`` the sparse FFN stores its one T x F
      residual ``relu(y1)`` packed (see ``remat_storage``).
    remat_storage: the packed format under ``"compressed"``/``"offload"``: ``"auto"`` (2:4 values + indices, 9/16 of
      dense and exact, when the residual is 2:4 -- the activation recipe; the bitmask otherwise), ``"24"`` or
      ``"bitmask"`` (1/16 + ``remat_capacity`` of dense; values beyond the capacity are dropped, consistently in the
      forward and the backward).
    remat_capacity: the bitmask's values buffer as a fraction of T x F.
    implementation: ``None`` (the fastest measured: Pallas sparsify kernels on a GPU, XLA GEMMs on the 2:4 operands
      -- in the FFN's fwd+bwd the cuSPARSELt route measured slower on the H100, ``benchmarks/results/ffn.json``),
      ``"pallas"`` (Pallas sparsify kernels, plain XLA GEMMs), ``"xla"``
      (pure XLA) or ``"cusparselt"`` (cuSPARSELt 2:4 GEMMs, best sparsify kernels; raises where it cannot run).
    num_groups: ``"vnm"``: E, the number of neuron groups (d_ff/E must be a multiple of ``router_block``).
    router_block: ``"vnm"``: group sizes are multiples of this (128 = the grouped-GEMM tile; smaller for tests).
    recluster_every: ``"vnm"``: re-cluster the neurons every this many optimizer steps (0 = only at the sparse
      phase's start); driven by :func:`jsparse.models.after_optimizer_step`.
    router_seed: ``"vnm"``: seed of the k-means++ initialisation.
    vnm_blocks: ``"vnm"``: optional ``(v, n, m)`` V:N:M pruning of each token's group activations (a quality/format
      option: on Hopper in JAX the GEMM still runs on dense tensor cores).
    sparse: whether a freshly built :class:`SparseFFN` starts in its sparse mode (``models.set_sparse`` flips it).
    stats: sow the per-layer statistics (``act_density``, ``dropped_mass``, ``dense_features``).
  """

  kind: str = "squared_relu"
  activation_sparsity: str | None = None
  weight_sparsity: str | None = None
  weight_sparsity_on: str = "both"
  permute_tokens: bool = True
  permutation: str = "random"
  permutation_seed: int = 0
  reuse_mask_in_backward: bool = True
  dense_fraction: float = 0.05
  dense_multiple: int = 128
  token_24_weight_grads: bool | None = None
  remat: str | None = None
  remat_storage: str = "auto"
  remat_capacity: float = 0.25
  implementation: str | None = None
  num_groups: int = 8
  router_block: int = 128
  recluster_every: int = 0
  router_seed: int = 0
  vnm_blocks: tuple[int, int, int] | None = None
  sparse: bool = True
  stats: bool = True

  def __post_init__(self):
    op = "FFNConfig"
    _check_choice(op, "kind", self.kind, FFN_KINDS)
    _check_choice(op, "activation_sparsity", self.activation_sparsity, ACTIVATION_SPARSITY)
    _check_choice(op, "weight_sparsity", self.weight_sparsity, WEIGHT_SPARSITY)
    _check_choice(op, "weight_sparsity_on", self.weight_sparsity_on, WEIGHT_TARGETS)
    _check_choice(op, "permutation", self.permutation, ("random", "fixed"))
    _check_choice(op, "implementation", self.implementation, IMPLEMENTATIONS)
    _check_choice(op, "remat_storage", self.remat_storage, ("auto", "24", "bitmask"))
    if self.remat is not None:
      _ops.remat_policy(self.remat)  # raises on an unknown name
    if not 0.0 < self.remat_capacity <= 1.0:
      raise ValueError(f"{op}: remat_capacity must be in (0, 1], got {self.remat_capacity}")
    if self.remat_storage == "24" and not (self.activation_24 and self.reuse_mask_in_backward):
      raise ValueError(f"{op}: remat_storage='24' needs a 2:4 residual (activation_sparsity='2:4' with "
                       f"reuse_mask_in_backward)")
    if not 0.0 <= self.dense_fraction <= 1.0:
      raise ValueError(f"{op}: dense_fraction must be in [0, 1], got {self.dense_fraction}")
    if not (isinstance(self.dense_multiple, int) and self.dense_multiple >= 1):
      raise ValueError(f"{op}: dense_multiple must be a positive int, got {self.dense_multiple!r}")
    if self.kind != "sparse" and (self.activation_sparsity or self.weight_sparsity):
      raise ValueError(f"{op}: activation_sparsity/weight_sparsity need kind='sparse', got kind={self.kind!r}")
    if self.vnm_blocks is not None:
      object.__setattr__(self, "vnm_blocks", tuple(int(v) for v in self.vnm_blocks))
      if len(self.vnm_blocks) != 3:
        raise ValueError(f"{op}: vnm_blocks must be (v, n, m), got {self.vnm_blocks!r}")
    if self.activation_sparsity == "vnm":
      self.router_config()  # validates num_groups, router_block, recluster_every
      if self.remat is not None and self.remat not in ("save_dense", "recompute"):
        raise ValueError(f"{op}: activation_sparsity='vnm' supports remat None, 'save_dense' or 'recompute', got "
                         f"{self.remat!r}")
    if self.activation_sparsity == "vnm" and self.weight_sparsity is not None:
      raise ValueError(f"{op}: activation_sparsity='vnm' does not combine with weight_sparsity yet")

  def router_config(self):
    """The :class:`jsparse.RouterConfig` of a ``"vnm"`` FFN."""
    return RouterConfig(num_groups=self.num_groups, block=self.router_block, recluster_every=self.recluster_every)

  @property
  def activation_24(self) -> bool:
    return self.activation_sparsity == "2:4"

  @property
  def sparse_w1(self) -> bool:
    return self.weight_sparsity is not None and self.weight_sparsity_on in ("w1", "both")

  @property
  def sparse_w2(self) -> bool:
    return self.weight_sparsity is not None and self.weight_sparsity_on in ("w2", "both")

  @property
  def weight_grads_24(self) -> bool:
    """Whether the weight-gradient GEMMs use the token-wise 2:4 split."""
    if self.token_24_weight_grads is None:
      return self.activation_24
    return bool(self.token_24_weight_grads)

  @property
  def has_sparsity(self) -> bool:
    return self.activation_sparsity is not None or self.weight_sparsity is not None

  @property
  def residual_storage(self) -> str:
    """How the sparse FFN stores ``relu(y1)`` for the backward: ``"dense"``, ``"24"`` or ``"bitmask"``."""
    if self.remat not in ("compressed", "offload"):
      return "dense"
    if self.remat_storage != "auto":
      return self.remat_storage
    return "24" if (self.activation_24 and self.reuse_mask_in_backward) else "bitmask"

  def replace(self, **changes: Any) -> "FFNConfig":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """A Llama-style decoder (RMSNorm, RoPE, grouped-query causal attention, configurable FFN per layer).

  Attributes:
    vocab_size, d_model, n_layers, n_heads: the usual sizes. ``d_model % n_heads == 0`` and the head size even.
    n_kv_heads: key/value heads (grouped-query attention); ``None`` = ``n_heads``.
    d_ff: FFN hidden size (for ``kind="swiglu"`` pass the parameter-matched size, see ``swiglu_matched_d_ff``).
    max_len: longest sequence (RoPE table).
    tie_embeddings: the output projection is the embedding's transpose.
    param_dtype, compute_dtype: dtype names (``"float32"``, ``"bfloat16"``). Logits are always float32.
    ffn: the FFN of every layer.
    ffn_overrides: ``((layer, FFNConfig), ...)``: per-layer exceptions (e.g. keep the first layer dense).
    remat: checkpoint policy name applied to every block (``None``: none); FFNs without their own ``remat`` take it
      too, so that e.g. ``"compressed"`` stores the FFN residual packed and the block keeps only that.
    rope_theta, norm_eps: RoPE base and RMSNorm epsilon.
    attention_implementation: passed to ``jax.nn.dot_product_attention`` (``"xla"``, ``"cudnn"``); ``None`` = cuDNN's
      fused attention on a GPU for bf16/fp16 compute where it accepts the shape, XLA otherwise.
  """

  vocab_size: int = 256
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int | None = None
  d_ff: int = 256
  max_len: int = 128
  tie_embeddings: bool = True
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  ffn: FFNConfig = FFNConfig()
  ffn_overrides: tuple[tuple[int, FFNConfig], ...] = ()
  remat: str | None = None
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  attention_implementation: str | None = None

  def __post_init__(self):
    op = "TransformerConfig"
    object.__setattr__(self, "param_dtype", _dtype_name(op, "param_dtype", self.param_dtype))
    object.__setattr__(self, "compute_dtype", _dtype_name(op, "compute_dtype", self.compute_dtype))
    if isinstance(self.ffn, dict):
      object.__setattr__(self, "ffn", FFNConfig(**self.ffn))
    overrides = tuple((int(i), FFNConfig(**c) if isinstance(c, dict) else c) for i, c in
                      (self.ffn_overrides.items() if isinstance(self.ffn_overrides, dict) else self.ffn_overrides))
    object.__setattr__(self, "ffn_overrides", overrides)
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_len"):
      value = getattr(self, name)
      if not (isinstance(value, int) and value >= 1):
        raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")
    if self.d_model % self.n_heads:
      raise ValueError(f"{op}: d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")
    if (self.d_model // self.n_heads) % 2:
      raise ValueError(f"{op}: the head size d_model/n_heads={self.d_model // self.n_heads} must be even (RoPE)")
    if self.kv_heads < 1 or self.n_heads % self.kv_heads:
      raise ValueError(f"{op}: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    for i, c in self.ffn_overrides:
      if not 0 <= i < self.n_layers:
        raise ValueError(f"{op}: ffn_overrides names layer {i}, outside 0..{self.n_layers - 1}")
      if not isinstance(c, FFNConfig):
        raise ValueError(f"{op}: ffn_overrides[{i}] must be an FFNConfig, got {type(c).__name__}")
    _check_choice(op, "attention_implementation", self.attention_implementation, ATTENTION_IMPLEMENTATIONS)
    for c in (self.ffn, *(c for _, c in self.ffn_overrides)):
      if c.activation_sparsity == "vnm":
        c.router_config().group_size(self.d_ff)  # F must split into E groups of a multiple of router_block
    if self.remat is not None:
      _ops.remat_policy(self.remat)  # raises on an unknown name

  @property
  def kv_heads(self) -> int:
    return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  def layer_ffn(self, layer: int) -> FFNConfig:
    """The FFN configuration of ``layer`` (an override if one is given)."""
    for i, c in self.ffn_overrides:
      if i == layer:
        return c
    return self.ffn

  def replace(self, **changes: Any) -> "TransformerConfig":
    return dataclasses.replace(self, **changes)
