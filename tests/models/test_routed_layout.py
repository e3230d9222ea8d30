"""The routed FFN's fast layout: weights (and optimizer moments) stored in router order, re-laid out at re-clusterings.

``models.phases.group_weights`` must leave the model's function and the optimizer's trajectory unchanged: the grouped
model is compared with an untouched copy of itself, step by step, through Adam updates and re-clusterings.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jsparse import models
from jsparse.models import phases

D, F = 16, 64
# implementation="xla": the masked-dense reference on CPU (what the grouped GEMMs compute on a GPU).
ROUTED = models.FFNConfig(kind="sparse", activation_sparsity="vnm", num_groups=4, router_block=8,
                          implementation="xla", stats=False)


class Net(nnx.Module):
  """A routed FFN under a path (as in the Transformer), so the optimizer's moments are found by path suffix."""

  def __init__(self, config):
    self.blocks = nnx.List([models.SparseFFN(D, F, config, rngs=nnx.Rngs(0))])

  def __call__(self, x):
    return self.blocks[0](x)


def _x(seed=1):
  return jax.random.normal(jax.random.key(seed), (48, D), jnp.float32)


def _loss(model, x):
  return jnp.mean(jnp.square(model(x) - jnp.sin(x)))


@nnx.jit
def _step(model, optimizer, x):
  loss, grads = nnx.value_and_grad(_loss)(model, x)
  optimizer.update(model, grads)
  phases.after_optimizer_step(model, optimizer)
  return loss


def _pair(config, warm_steps=2):
  """A model + Adam after a few steps (non-zero moments), and an independent copy of both."""
  model = Net(config)
  opt = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)
  for i in range(warm_steps):
    _step(model, opt, _x(10 + i))
  graphdef, state = nnx.split((model, opt))
  return (model, opt), nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def _close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


def test_group_weights_keeps_the_function_and_the_optimizer_trajectory():
  (ref, ref_opt), (grp, grp_opt) = _pair(ROUTED)
  perm = np.asarray(ref.blocks[0].router_perm[...])
  assert not np.array_equal(perm, np.arange(F))  # the clustering really moves neurons
  phases.group_weights(grp, grp_opt)
  ffn = grp.blocks[0]
  assert ffn.weights_grouped and ref.blocks[0].weights_grouped is False
  np.testing.assert_array_equal(ffn.router_perm[...], np.arange(F))
  np.testing.assert_array_equal(ffn.w1[...], np.asarray(ref.blocks[0].w1[...])[:, perm])
  np.testing.assert_array_equal(ffn.w2[...], np.asarray(ref.blocks[0].w2[...])[perm])
  mu = grp_opt.opt_state[0].mu
  np.testing.assert_array_equal(mu["blocks"][0]["w1"][...], np.asarray(ref_opt.opt_state[0].mu["blocks"][0]["w1"][...])[:, perm])
  # Same outputs and loss before and after the re-layout, then the same Adam trajectory (moments moved alike).
  x = _x()
  _close(grp(x), ref(x))
  for i in range(3):
    _close(_step(grp, grp_opt, _x(20 + i)), _step(ref, ref_opt, _x(20 + i)))
  _close(ffn.w1[...], np.asarray(ref.blocks[0].w1[...])[:, perm])
  _close(ffn.w2[...], np.asarray(ref.blocks[0].w2[...])[perm])
  _close(grp(x), ref(x))
  phases.group_weights(grp, grp_opt)  # idempotent: the permutation is already the identity
  _close(grp(x), ref(x))


def test_reclustering_re_lays_out_weights_and_moments():
  cfg = ROUTED.replace(recluster_every=2)
  (ref, ref_opt), (grp, grp_opt) = _pair(cfg, warm_steps=1)
  phases.group_weights(grp, grp_opt)
  ffn = grp.blocks[0]
  x = _x()
  perms = []
  for i in range(4):  # re-clusterings at steps 2 and 4 (the counter was at 1)
    _close(_step(grp, grp_opt, _x(30 + i)), _step(ref, ref_opt, _x(30 + i)))
    np.testing.assert_array_equal(ffn.router_perm[...], np.arange(F))  # stays the identity
    perms.append(np.asarray(ref.blocks[0].router_perm[...]))
    _close(grp(x), ref(x))
  assert int(ffn.router_step[...]) == int(ref.blocks[0].router_step[...]) == 5
  assert not np.array_equal(perms[0], perms[-1])  # the reference's clustering moved
  # Group g of the grouped model's storage holds the reference's group-g neurons (the order inside a group follows
  # the storage order at each re-clustering, so compare the columns as sets).
  fe = F // ROUTED.num_groups
  for g in range(ROUTED.num_groups):
    a = np.asarray(ref.blocks[0].w1[...])[:, perms[-1][g * fe:(g + 1) * fe]]
    b = np.asarray(ffn.w1[...])[:, g * fe:(g + 1) * fe]
    _close(b[:, np.argsort(b.sum(0))], a[:, np.argsort(a.sum(0))])


def test_grouped_weights_need_the_optimizer_to_re_cluster():
  (model, opt), _ = _pair(ROUTED.replace(recluster_every=2), warm_steps=0)
  phases.group_weights(model, opt)
  with pytest.raises(ValueError, match="models.after_optimizer_step\\(model, optimizer\\)"):
    phases.after_optimizer_step(model)
  with pytest.raises(ValueError, match="prepare_sparse_phase\\(model, tokens, optimizer\\)"):
    phases.prepare_sparse_phase(model)
  phases.prepare_sparse_phase(model, None, opt)  # re-clusters and lays the new clustering out
  np.testing.assert_array_equal(model.blocks[0].router_perm[...], np.arange(F))
  with pytest.raises(ValueError, match="only a routed"):
    models.SparseFFN(D, F, models.FFNConfig(kind="sparse"), rngs=nnx.Rngs(0)).group_weights()
  # An optimizer state under the weight that is not shaped like it cannot be permuted.
  factored = nnx.Optimizer(model, optax.adafactor(1e-2, min_dim_size_to_factor=8), wrt=nnx.Param)
  with pytest.raises(ValueError, match="cannot be applied"):
    phases.group_weights(model, factored)
