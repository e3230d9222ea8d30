"""The decoder LM: shapes, causality, tied/untied heads, presets, remat, phases, and overfitting a fixed batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jsparse import models
from tests.helpers import assert_close

TEXT = b"The quick brown fox jumps over the lazy dog; sparse 2:4 activations make FFNs faster. 0123456789 xyz!"
ACT24 = dict(kind="sparse", activation_sparsity="2:4", dense_multiple=4)
MODES = {
    "squared_relu": dict(kind="squared_relu"),
    "swiglu": dict(kind="swiglu"),
    "act24": ACT24,
    "sste": dict(kind="sparse", weight_sparsity="2:4-sste"),
    "act24+sste": dict(ACT24, weight_sparsity="2:4-sste"),
    "routed": dict(kind="sparse", activation_sparsity="vnm", num_groups=2, router_block=32),
}


def _batch(b=4, length=32):
  toks = np.frombuffer(TEXT, np.uint8).astype(np.int32)
  rows = np.stack([np.roll(toks, 11 * i)[:length + 1] for i in range(b)])
  return jnp.asarray(rows[:, :-1]), jnp.asarray(rows[:, 1:])


def _tokens(shape=(2, 16), seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 0, 256)


def _tiny(**overrides):
  """The tiny preset with one layer (compile time dominates these CPU tests)."""
  return models.preset("tiny", **dict(dict(n_layers=1), **overrides))


def test_logits_shape_dtype_and_causality():
  model = models.Transformer(_tiny(ffn=ACT24), rngs=nnx.Rngs(0))
  fwd = nnx.jit(lambda m, t: m(t))
  tok = _tokens()
  logits = fwd(model, tok)
  assert logits.shape == (2, 16, 256) and logits.dtype == jnp.float32
  changed = tok.at[:, 10:].set((tok[:, 10:] + 1) % 256)
  logits2 = fwd(model, changed)
  assert_close(logits2[:, :10], logits[:, :10])  # the future does not leak into the past
  assert not np.allclose(logits2[:, 10:], logits[:, 10:])


def test_tied_and_untied_embeddings_and_gqa():
  tied = models.Transformer(_tiny(), rngs=nnx.Rngs(0))
  untied = models.Transformer(_tiny(tie_embeddings=False), rngs=nnx.Rngs(0))
  count = lambda m: sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert count(untied) - count(tied) == 64 * 256
  assert tied.lm_head is None and untied.lm_head is not None
  attn = tied.layers[0].attn
  assert attn.wq.shape == (64, 64) and attn.wk.shape == (64, 32)  # 4 query heads share 2 key/value heads


def test_presets():
  one, seven = models.preset("1b"), models.preset("7b")
  assert (one.d_model, one.d_ff, one.n_layers) == (2048, 8192, 16)
  assert (seven.d_model, seven.d_ff) == (4096, 14336)
  assert models.preset("tiny").vocab_size == 256
  assert models.preset("tiny", n_layers=3).n_layers == 3
  cfg = models.preset("125m", ffn=dict(kind="sparse", activation_sparsity="2:4"))
  assert cfg.ffn == models.FFNConfig(kind="sparse", activation_sparsity="2:4")
  hash(cfg)  # static: usable as a jit static argument
  with pytest.raises(ValueError, match="unknown preset"):
    models.preset("3b")
  with pytest.raises(ValueError, match="unknown TransformerConfig fields"):
    models.preset("tiny", d_modle=3)
  # Parameter count of the 1b preset, without allocating it: Llama-3.2-1B's 1.24B less a third of its (SwiGLU)
  # FFN weights, since the squared-ReLU FFN has two D x F matrices instead of three.
  abstract = nnx.eval_shape(lambda: models.Transformer(one, rngs=nnx.Rngs(0)))
  n = sum(p.size for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  D, F, kv = 2048, 8192, 8 * 64
  assert n == 16 * (2 * D * F + 2 * D * D + 2 * D * kv + 2 * D) + 128256 * D + D


def test_per_layer_ffn_override_and_bf16():
  cfg = models.preset("tiny", ffn=ACT24, compute_dtype="bfloat16", param_dtype="bfloat16",
                      ffn_overrides=((0, models.FFNConfig(kind="swiglu")),))
  model = models.Transformer(cfg, rngs=nnx.Rngs(0))
  assert isinstance(model.layers[0].ffn, models.SwiGLUFFN) and isinstance(model.layers[1].ffn, models.SparseFFN)
  assert model.embed.dtype == jnp.bfloat16
  logits = nnx.jit(lambda m, t: m(t))(model, _tokens())
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
  assert set(models.collect_stats(model)) == {"layer1/act_density", "layer1/dropped_mass", "layer1/dense_features"}


def test_block_remat_gives_the_same_gradients():
  tok, tgt = _batch(2, 16)
  grads = []
  for remat in (None, "compressed"):
    cfg = _tiny(ffn=ACT24, remat=remat)
    model = models.Transformer(cfg, rngs=nnx.Rngs(0))
    loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(tok), tgt).mean()
    grads.append(nnx.jit(nnx.grad(loss))(model))
    assert model.layers[0].ffn.config.remat == remat  # the FFN stores its residual the block's way
  for g in grads[1:]:
    jax.tree.map(lambda a, b: assert_close(a, b), g, grads[0])


@nnx.jit
def _step(model, opt, inp, tgt):
  loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(inp), tgt).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  opt.update(model, grads)
  return loss


def _train(model, inp, tgt, steps, lr=1e-2):
  opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)
  losses = []
  for _ in range(steps):
    losses.append(float(_step(model, opt, inp, tgt)))
    models.collect_stats(model)
  return losses


# Bound: from ln(256) = 5.5 at initialisation to below 0.5 nats/byte in 40 Adam steps on one fixed batch (the
# modes reach ~0.01 in these runs); a broken gradient path in the FFN leaves it well above.
OVERFIT_STEPS, OVERFIT_BOUND = 40, 0.5


@pytest.mark.parametrize("mode", sorted(MODES))
def test_overfits_a_fixed_batch(mode):
  inp, tgt = _batch()
  model = models.Transformer(_tiny(ffn=MODES[mode]), rngs=nnx.Rngs(0))
  losses = _train(model, inp, tgt, OVERFIT_STEPS)
  assert losses[0] > 4.5 and losses[-1] < OVERFIT_BOUND, losses[::10]


def test_dense_then_sparse_then_dense_schedule():
  inp, tgt = _batch()
  model = models.Transformer(_tiny(ffn=MODES["act24+sste"]), rngs=nnx.Rngs(0))
  models.set_sparse(model, False)  # dense warm-up
  warm = _train(model, inp, tgt, 15)
  models.prepare_sparse_phase(model, inp)
  models.set_sparse(model, True)
  sparse = _train(model, inp, tgt, 15)
  models.set_sparse(model, False)
  final = _train(model, inp, tgt, 10)
  assert warm[-1] < warm[0] and sparse[-1] < 1.0 and final[-1] < OVERFIT_BOUND, (warm[::5], sparse[::5], final)
