"""Neuron-level router: balanced k-means, token routing, re-clustering schedule, captured mass, state pytree."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from jsparse import router as rt


def _planted(D=32, E=4, per=64, T=256, noise=0.2, seed=0):
  """W1 columns and tokens around E planted directions (group g's neurons ~ u_g, tokens ~ u_{label})."""
  rng = np.random.default_rng(seed)
  u = rng.standard_normal((E, D))
  u /= np.linalg.norm(u, axis=1, keepdims=True)
  label_F = rng.permutation(np.repeat(np.arange(E), per))
  w1 = (u[label_F] + noise * rng.standard_normal((E * per, D)) / np.sqrt(D)).T
  label_T = rng.integers(0, E, T)
  x = u[label_T] + noise * rng.standard_normal((T, D)) / np.sqrt(D)
  return jnp.asarray(w1, jnp.float32), label_F, jnp.asarray(x, jnp.float32), label_T


def test_balanced_assign_sizes_and_optimum():
  # Separable costs: every item has one clearly best group and the groups are exactly balanced -> identity.
  E, cap = 4, 8
  want = jnp.repeat(jnp.arange(E), cap)[::-1]
  d = jnp.where(jnp.arange(E)[None, :] == want[:, None], 0.0, 1.0) + 0.01 * jnp.arange(E * cap)[:, None]
  got = rt.balanced_assign(d, cap)
  np.testing.assert_array_equal(got, want)


def test_balanced_assign_overdemand_is_resolved_by_regret():
  # All 4 items prefer group 0 (capacity 2); items 0, 1 have the worst alternative, so they keep group 0.
  d = jnp.array([[0.0, 9.0], [0.0, 8.0], [0.0, 1.0], [0.0, 2.0]])
  np.testing.assert_array_equal(rt.balanced_assign(d, 2), [0, 0, 1, 1])


@pytest.mark.parametrize("E", [1, 2, 4])
def test_router_init_recovers_planted_groups(E):
  w1, label_F, x, label_T = _planted(E=E)
  cfg = rt.RouterConfig(num_groups=E, block=32, kmeans_iters=5)
  state = rt.router_init(w1, cfg, jax.random.key(1))
  F = w1.shape[1]
  # The permutation is a permutation; groups are contiguous, equal and multiples of block.
  np.testing.assert_array_equal(np.sort(np.asarray(state.perm_F)), np.arange(F))
  np.testing.assert_array_equal(state.group_sizes_E, np.full(E, F // E))
  ng = np.asarray(jsparse.neuron_groups(state))
  np.testing.assert_array_equal(ng[np.asarray(state.perm_F)], np.arange(F) // (F // E))
  # Every found group is one planted group (purity 1), and tokens go to their planted group's cluster.
  for g in range(E):
    assert len(np.unique(np.asarray(label_F)[ng == g])) == 1
  planted_to_found = {int(label_F[np.where(ng == g)[0][0]]): g for g in range(E)}
  groups = np.asarray(jsparse.route_tokens(x, state, cfg))
  np.testing.assert_array_equal(groups, [planted_to_found[int(l)] for l in np.asarray(label_T)])
  mass = float(jsparse.captured_mass(x, w1, state, jnp.asarray(groups)))
  if E == 1:
    assert mass == pytest.approx(1.0)
  else:  # the other groups' neurons still fire a little (random directions are not orthogonal in D=32)
    assert mass > 0.85


def test_captured_mass_definition():
  w1, _, x, _ = _planted(E=2)
  cfg = rt.RouterConfig(num_groups=2, block=32, kmeans_iters=2)
  state = rt.router_init(w1, cfg, jax.random.key(0))
  groups = jnp.asarray(np.random.default_rng(3).integers(0, 2, x.shape[0]), jnp.int32)
  mass = np.square(np.maximum(np.asarray(x, np.float64) @ np.asarray(w1, np.float64), 0))
  inside = np.asarray(jsparse.neuron_groups(state))[None, :] == np.asarray(groups)[:, None]
  want = (mass * inside).sum() / mass.sum()
  np.testing.assert_allclose(float(jsparse.captured_mass(x, w1, state, groups)), want, rtol=1e-4)


def test_token_rules():
  # dot: the group with the largest mean pre-activation; l2: nearest centroid. A long centroid separates them.
  cents = jnp.array([[4.0, 0.0], [0.0, 1.0]])
  state = rt.RouterState(cents, jnp.arange(4, dtype=jnp.int32), jnp.array([2, 2], jnp.int32), jnp.array(0))
  x = jnp.array([[0.6, 1.0]])
  assert int(jsparse.route_tokens(x, state, rt.RouterConfig(2, block=1))[0]) == 0  # 2.4 > 1.0
  assert int(jsparse.route_tokens(x, state, rt.RouterConfig(2, block=1, token_rule="l2"))[0]) == 1
  xb = jnp.zeros((3, 5, 2))
  assert jsparse.route_tokens(xb, state, rt.RouterConfig(2, block=1)).shape == (3, 5)


def test_update_reclusters_every_k_steps_and_state_is_a_pytree():
  w1, _, _, _ = _planted(E=2, per=32)
  cfg = rt.RouterConfig(num_groups=2, block=32, kmeans_iters=2, recluster_every=3)
  state = rt.router_init(w1, cfg, jax.random.key(0))
  # Drift the centroids so a re-clustering visibly resets them.
  drifted = dataclasses.replace(state, centroids_ExD=state.centroids_ExD + 1.0)
  update = jax.jit(lambda s, w: rt.router_update(s, w, cfg))
  s1 = update(drifted, w1)
  s2 = update(s1, w1)
  s3 = update(s2, w1)
  assert int(s1.step) == 1 and int(s3.step) == 3
  np.testing.assert_array_equal(s2.centroids_ExD, drifted.centroids_ExD)  # steps 1, 2: untouched
  np.testing.assert_allclose(s3.centroids_ExD, state.centroids_ExD, rtol=1e-5, atol=1e-6)  # step 3: re-clustered
  # Checkpointable: flatten to host arrays and back.
  leaves, treedef = jax.tree.flatten(s3)
  restored = jax.tree.unflatten(treedef, [np.asarray(a) for a in leaves])
  assert [a.shape for a in jax.tree.leaves(restored)] == [a.shape for a in leaves]
  never = rt.RouterConfig(num_groups=2, block=32)
  s = rt.router_update(drifted, w1, never)
  np.testing.assert_array_equal(s.centroids_ExD, drifted.centroids_ExD)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_groups=0), "num_groups"),
    (dict(num_groups=2, block=0), "block"),
    (dict(num_groups=2, token_rule="cosine"), "token_rule"),
    (dict(num_groups=2, recluster_every=-1), "recluster_every"),
])
def test_bad_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    rt.RouterConfig(**kwargs)


def test_bad_shapes():
  w1 = jnp.zeros((8, 384))
  with pytest.raises(ValueError, match="do not split"):
    rt.router_init(w1, rt.RouterConfig(num_groups=5), jax.random.key(0))
  with pytest.raises(ValueError, match="multiple of block=128"):
    rt.router_init(w1, rt.RouterConfig(num_groups=2), jax.random.key(0))
  with pytest.raises(ValueError, match=r"shape \(D, F\)"):
    rt.router_init(jnp.zeros((384,)), rt.RouterConfig(num_groups=3), jax.random.key(0))
  state = rt.router_init(w1, rt.RouterConfig(num_groups=3, kmeans_iters=1), jax.random.key(0))
  with pytest.raises(ValueError, match="state has 3 groups"):
    rt.router_recluster(state, jnp.zeros((8, 256)), rt.RouterConfig(num_groups=2))
  with pytest.raises(ValueError, match="last axis D=8"):
    jsparse.route_tokens(jnp.zeros((4, 9)), state, rt.RouterConfig(num_groups=3))
