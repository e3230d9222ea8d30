"""A Llama-style decoder LM (flax.nnx): RMSNorm, RoPE, grouped-query causal attention, one FFN per layer.

``Transformer(cfg, rngs=...)(tokens_BxL) -> logits_BxLxV`` (float32). Each layer's FFN comes from
``cfg.layer_ffn(i)``: ``SquaredReLUFFN``, ``SwiGLUFFN`` (at the parameter-matched width
``swiglu_matched_d_ff(cfg.d_ff)``) or ``SparseFFN``. Attention goes through ``jax.nn.dot_product_attention`` (``is_causal=True``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jsparse.models import _ops
from jsparse.models.config import FFNConfig, TransformerConfig
from jsparse.models.ffn import SquaredReLUFFN, SwiGLUFFN, init_weight, swiglu_matched_d_ff
from jsparse.models.sparse_ffn import SparseFFN

ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT = "attn_q", "attn_k", "attn_v", "attn_out"


def build_ffn(config: FFNConfig, d_model: int, d_ff: int, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Module:
  """The FFN module an :class:`FFNConfig` describes (``d_ff`` is the squared-ReLU width)."""
  if config.kind == "squared_relu":
    return SquaredReLUFFN(d_model, d_ff, dtype=dtype, param_dtype=param_dtype, remat=config.remat, rngs=rngs)
  if config.kind == "swiglu":
    return SwiGLUFFN(d_model, swiglu_matched_d_ff(d_ff), dtype=dtype, param_dtype=param_dtype, remat=config.remat,
                     rngs=rngs)
  return SparseFFN(d_model, d_ff, config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class RMSNorm(nnx.Module):
  """``x / rms(x) * scale``, computed in float32, returned in the compute dtype."""

  def __init__(self, dim: int, *, eps: float = 1e-5, dtype=None, param_dtype=jnp.float32):
    self.eps, self.dtype = eps, dtype
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype or x.dtype)


def rope_tables(length: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """(cos, sin), each ``(length, head_dim // 2)`` float32, for positions ``0..length-1``."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles_LxK = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  return jnp.cos(angles_LxK), jnp.sin(angles_LxK)


def apply_rope(x_BxLxNxH: jax.Array, cos_LxK: jax.Array, sin_LxK: jax.Array) -> jax.Array:
  """Rotary embedding, rotate-half convention (first and second halves of the head are the pair)."""
  half = x_BxLxNxH.shape[-1] // 2
  x32 = x_BxLxNxH.astype(jnp.float32)
  a, b = x32[..., :half], x32[..., half:]
  cos, sin = cos_LxK[None, :, None, :], sin_LxK[None, :, None, :]
  return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1).astype(x_BxLxNxH.dtype)


def auto_attention(dtype) -> str:
  """What ``attention_implementation=None`` tries first: cuDNN's fused (flash) kernel on a GPU for 16-bit compute,
  XLA otherwise."""
  on_gpu = jax.default_backend() == "gpu"
  return "cudnn" if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


def _attention(q, k, v, implementation: str | None) -> jax.Array:
  """Causal attention; ``None`` = :func:`auto_attention`, falling back to XLA where cuDNN rejects the shape."""
  if implementation is None and auto_attention(q.dtype) == "cudnn":
    # XLA's attention materialises the B x N x L x L scores; on the 1b shape that made attention, not the FFN,
    # the largest part of the step. cuDNN rejects some shapes at trace time: those stay on XLA.
    try:
      return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    except (ValueError, NotImplementedError, RuntimeError, TypeError):
      pass
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


class Attention(nnx.Module):
  """Grouped-query causal self-attention with RoPE (no biases)."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    self.n_heads, self.kv_heads, self.head_dim = N, K, H
    self.dtype = jnp.dtype(cfg.compute_dtype)
    self.implementation = cfg.attention_implementation
    std = D ** -0.5
    self.wq = init_weight(rngs, (D, N * H), std, cfg.param_dtype)
    self.wk = init_weight(rngs, (D, K * H), std, cfg.param_dtype)
    self.wv = init_weight(rngs, (D, K * H), std, cfg.param_dtype)
    self.wo = init_weight(rngs, (N * H, D), (N * H) ** -0.5, cfg.param_dtype)

  def __call__(self, x_BxLxD: jax.Array, cos_LxK: jax.Array, sin_LxK: jax.Array) -> jax.Array:
    B, L, _ = x_BxLxD.shape
    dt = self.dtype
    q = checkpoint_name((x_BxLxD @ self.wq[...].astype(dt)).reshape(B, L, self.n_heads, self.head_dim), ATTN_Q)
    k = checkpoint_name((x_BxLxD @ self.wk[...].astype(dt)).reshape(B, L, self.kv_heads, self.head_dim), ATTN_K)
    v = checkpoint_name((x_BxLxD @ self.wv[...].astype(dt)).reshape(B, L, self.kv_heads, self.head_dim), ATTN_V)
    q, k = apply_rope(q, cos_LxK, sin_LxK), apply_rope(k, cos_LxK, sin_LxK)
    o_BxLxNxH = _attention(q, k, v, self.implementation)
    o_BxLxD = checkpoint_name(o_BxLxNxH.reshape(B, L, self.n_heads * self.head_dim), ATTN_OUT)
    return o_BxLxD @ self.wo[...].astype(dt)


class Block(nnx.Module):
  """Pre-norm residual block: ``x + attn(norm(x))``, then ``+ ffn(norm(.))``."""

  def __init__(self, cfg: TransformerConfig, layer: int, *, rngs: nnx.Rngs):
    dt = jnp.dtype(cfg.compute_dtype)
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dt, param_dtype=cfg.param_dtype)
    self.attn = Attention(cfg, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dt, param_dtype=cfg.param_dtype)
    ffn_cfg = cfg.layer_ffn(layer)
    if ffn_cfg.remat is None and cfg.remat is not None:
      # The FFN stores its residual in the block policy's format (e.g. packed for "compressed"), so that what the
      # block saves is what the FFN's backward reads.
      ffn_cfg = ffn_cfg.replace(remat=cfg.remat)
    self.ffn = build_ffn(ffn_cfg, cfg.d_model, cfg.d_ff, dtype=dt, param_dtype=cfg.param_dtype,
                         rngs=rngs)

  def __call__(self, x_BxLxD: jax.Array, cos_LxK: jax.Array, sin_LxK: jax.Array) -> jax.Array:
    x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), cos_LxK, sin_LxK)
    return x_BxLxD + self.ffn(self.ffn_norm(x_BxLxD))


def _call_block(block: Block, x, cos, sin):
  return block(x, cos, sin)


class Transformer(nnx.Module):
  """Decoder-only causal LM.

  Args:
    cfg: a :class:`TransformerConfig` (see ``models.preset``).
    rngs: ``nnx.Rngs`` (``params`` for the weights; ``permute`` or the default stream for the sparse FFNs'
      token permutations).

  Call:
    ``model(tokens_BxL)`` with int tokens in ``[0, vocab_size)``, ``L <= max_len``; returns float32 logits
    ``(B, L, vocab_size)``.
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    if not isinstance(cfg, TransformerConfig):
      raise ValueError(f"Transformer: cfg must be a TransformerConfig, got {type(cfg).__name__}")
    self.cfg = cfg
    self.embed = init_weight(rngs, (cfg.vocab_size, cfg.d_model), cfg.d_model ** -0.5, cfg.param_dtype)
    self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=jnp.dtype(cfg.compute_dtype),
                              param_dtype=cfg.param_dtype)
    self.lm_head = None if cfg.tie_embeddings else init_weight(rngs, (cfg.d_model, cfg.vocab_size),
                                                               cfg.d_model ** -0.5, cfg.param_dtype)

  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    cfg = self.cfg
    if jnp.ndim(tokens_BxL) != 2 or not jnp.issubdtype(jnp.result_type(tokens_BxL), jnp.integer):
      raise ValueError(f"Transformer: tokens must be an int array (B, L), got {jnp.result_type(tokens_BxL)} "
                       f"{jnp.shape(tokens_BxL)}")
    L = tokens_BxL.shape[1]
    if L > cfg.max_len:
      raise ValueError(f"Transformer: sequence length {L} exceeds max_len={cfg.max_len}")
    dt = jnp.dtype(cfg.compute_dtype)
    x_BxLxD = jnp.take(self.embed[...], tokens_BxL, axis=0).astype(dt)
    cos_LxK, sin_LxK = rope_tables(L, cfg.head_dim, cfg.rope_theta)
    call = _call_block if cfg.remat is None else nnx.remat(_call_block, policy=_ops.remat_policy(cfg.remat))
    for block in self.layers:
      x_BxLxD = call(block, x_BxLxD, cos_LxK, sin_LxK)
    x_BxLxD = self.final_norm(x_BxLxD)
    head_DxV = self.embed[...].T if self.lm_head is None else self.lm_head[...]
    return jnp.einsum("bld,dv->blv", x_BxLxD, head_DxV.astype(dt), preferred_element_type=jnp.float32)
