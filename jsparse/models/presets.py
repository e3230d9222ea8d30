"""Named model sizes: ``preset(name, **overrides) -> TransformerConfig``.

=========  =====  ======  ======  ======  ========  =======  ==========================================
name       D      layers  heads   kv      F         vocab    notes
=========  =====  ======  ======  ======  ========  =======  ==========================================
``tiny``   64     2       4       2       256       256      byte-level, float32: CPU tests and smoke runs
``125m``   768    12      12      12      3072      32000    GPT-2-small-sized
``1b``     2048   16      32      8       8192      128256   Llama-3.2-1B shapes, tied embeddings
``7b``     4096   32      32      8       14336     128256   Llama-3-8B shapes (the paper's "7B")
=========  =====  ======  ======  ======  ========  =======  ==========================================

The larger presets keep float32 parameters and compute in bfloat16; override ``param_dtype``/``compute_dtype`` for
bf16 parameters. ``F`` is the squared-ReLU width; a ``"swiglu"`` FFN uses the parameter-matched width.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jsparse.models.config import FFNConfig, TransformerConfig

PRESETS: dict[str, TransformerConfig] = {
    "tiny": TransformerConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256,
                              max_len=128, tie_embeddings=True, param_dtype="float32", compute_dtype="float32"),
    "125m": TransformerConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=3072,
                              max_len=2048, tie_embeddings=True, param_dtype="float32", compute_dtype="bfloat16"),
    "1b": TransformerConfig(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
                            max_len=4096, tie_embeddings=True, param_dtype="float32", compute_dtype="bfloat16",
                            rope_theta=500000.0),
    "7b": TransformerConfig(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                            max_len=4096, tie_embeddings=False, param_dtype="float32", compute_dtype="bfloat16",
                            rope_theta=500000.0),
}


def preset(name: str, **overrides: Any) -> TransformerConfig:
  """The named :class:`TransformerConfig` with ``overrides`` applied.

  Args:
    name: ``"tiny"``, ``"125m"``, ``"1b"`` or ``"7b"``.
    **overrides: any :class:`TransformerConfig` field. ``ffn`` may be an :class:`FFNConfig` or a dict of its fields.

  Raises:
    ValueError: unknown preset or field.
  """
  if name not in PRESETS:
    raise ValueError(f"preset: unknown preset {name!r}; known: {sorted(PRESETS)}")
  fields = {f.name for f in dataclasses.fields(TransformerConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"preset: unknown TransformerConfig fields {unknown}")
  if isinstance(overrides.get("ffn"), dict):
    overrides["ffn"] = FFNConfig(**overrides["ffn"])
  return dataclasses.replace(PRESETS[name], **overrides)
