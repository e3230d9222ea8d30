"""Neuron-level router for the routed squared-ReLU FFN (Madhyastha et al. 2026, Fig. 4).

W1's columns (one per FFN neuron) are clustered into E groups of equal size by L2 k-means; each token is sent to one
group; only the (token group g, neuron group g) tiles of the FFN are computed (:func:`jsparse.routed_ffn`).

**Clustering.** Lloyd iterations of L2 k-means on the F columns of ``w1_DxF`` (k-means++ initialisation on the first
clustering, warm start from the current centroids afterwards), where the assignment step is *balanced*: every group
gets exactly ``F/E`` neurons, a multiple of ``config.block`` (128 by default, the kernels' tile), so that W1 acts as
``[E, D, F/E]`` and W2 as ``[E, F/E, D]`` after the neuron permutation. The balanced assignment is a greedy
regret rule, run once per Lloyd iteration (E-1 vectorised steps of O(F E) each):

1. among the still-open groups, take the one with the highest *demand* (most free neurons whose nearest open centroid
   it is; ties to the lower index);
2. give it the ``F/E`` free neurons with the smallest regret ``d(f, g) - min_{g' open, g' != g} d(f, g')`` (the
   neurons that lose most by going anywhere else), and close it;
3. the last open group takes the neurons left.

A group whose demand is below capacity therefore gets all the neurons that want it plus the next-best ones, and an
over-demanded group keeps the neurons that have the worst alternatives. It is deterministic given the centroids.

**Token rule.** ``token_rule="dot"`` (default) sends token x to ``argmax_g x . c_g``. Because c_g is the mean of the
group's W1 columns, ``x . c_g`` is exactly the *mean pre-activation* of group g's neurons for this token (its
"pre-activation signature" averaged over the group), so the rule picks the group whose neurons are, on average, the
most switched on -- the best cheap proxy (a ``[T, D] x [D, E]`` product) for "the group holding the most relu^2
mass". ``token_rule="l2"`` is the literal nearest centroid, ``argmin_g |x - c_g|^2 = argmax_g 2 x . c_g - |c_g|^2``;
it penalises groups with long centroids, which is not what a squared-ReLU cares about, so it is offered for
comparison only. The paper's own token-scoring rule is not public (papers.md §2.4: NOT FOUND).

**Metric.** :func:`captured_mass`: the fraction of the dense FFN's squared-ReLU activation mass that falls inside each
token's assigned group (1.0 = routing drops nothing; ``1/E`` = no better than a random group).

**State.** :class:`RouterState` is a pytree of arrays (centroids, neuron permutation, group sizes, step counter), so it
lives in the model state and is checkpointed with it; :class:`RouterConfig` is static.

**Weight layout.** :func:`jsparse.routed_ffn` accepts W1/W2 in their original neuron order and gathers them into
router order every step (and the gradients back), which costs two weight-sized gathers per pass. A model can instead
keep its FFN weights in router order: after each (re-)clustering it applies :func:`settle_permutation`'s permutation
to W1, W2 and their optimizer moments (:func:`take_neurons`) and calls ``routed_ffn(..., weights_grouped=True)``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

TOKEN_RULES = ("dot", "l2")


@dataclasses.dataclass(frozen=True)
class RouterConfig:
  """Static router configuration.

  Attributes:
    num_groups: E, the number of neuron groups (experts). Any positive int; F must split into E groups of a multiple
      of ``block`` neurons.
    block: neuron-group sizes are multiples of this (128 = the grouped-GEMM kernel's tile; smaller values are for
      tests and the XLA paths).
    kmeans_iters: Lloyd iterations per (re-)clustering.
    recluster_every: :func:`router_update` re-clusters every this many steps (0 = never).
    token_rule: ``"dot"`` (default) or ``"l2"``; see the module docstring.
  """

  num_groups: int
  block: int = 128
  kmeans_iters: int = 10
  recluster_every: int = 0
  token_rule: str = "dot"

  def __post_init__(self):
    if not isinstance(self.num_groups, int) or self.num_groups < 1:
      raise ValueError(f"RouterConfig: num_groups must be a positive int, got {self.num_groups!r}")
    if not isinstance(self.block, int) or self.block < 1:
      raise ValueError(f"RouterConfig: block must be a positive int, got {self.block!r}")
    if not isinstance(self.kmeans_iters, int) or self.kmeans_iters < 0:
      raise ValueError(f"RouterConfig: kmeans_iters must be a non-negative int, got {self.kmeans_iters!r}")
    if not isinstance(self.recluster_every, int) or self.recluster_every < 0:
      raise ValueError(f"RouterConfig: recluster_every must be a non-negative int, got {self.recluster_every!r}")
    if self.token_rule not in TOKEN_RULES:
      raise ValueError(f"RouterConfig: token_rule must be one of {TOKEN_RULES}, got {self.token_rule!r}")

  def group_size(self, num_neurons: int) -> int:
    """Neurons per group (F/E), after checking that F splits into E groups of a multiple of ``block``.

    Raises:
      ValueError: F is not divisible by E, or F/E is not a multiple of ``block``.
    """
    E = self.num_groups
    if num_neurons % E:
      raise ValueError(f"router: F={num_neurons} neurons do not split into num_groups={E} equal groups")
    size = num_neurons // E
    if size % self.block:
      raise ValueError(f"router: F/E = {num_neurons}/{E} = {size} neurons per group is not a multiple of "
                       f"block={self.block} (the grouped-GEMM tile); pick E so that F/E is a multiple of {self.block}")
    return size


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RouterState:
  """Router state (a pytree of arrays; checkpoint it with the model).

  Attributes:
    centroids_ExD: float32 (E, D) -- mean W1 column of each neuron group.
    perm_F: int32 (F,) -- neuron order: group g is ``perm_F[g * F/E : (g + 1) * F/E]`` (ascending inside a group).
    group_sizes_E: int32 (E,) -- neurons per group (all F/E: the clustering is balanced).
    step: int32 () -- steps seen by :func:`router_update`.
  """

  centroids_ExD: jax.Array
  perm_F: jax.Array
  group_sizes_E: jax.Array
  step: jax.Array

  @property
  def num_groups(self) -> int:
    return self.centroids_ExD.shape[0]


def _check_w1(op: str, w1_DxF: jax.Array, config: RouterConfig) -> int:
  if jnp.ndim(w1_DxF) != 2:
    raise ValueError(f"{op}: w1 must have shape (D, F), got {tuple(jnp.shape(w1_DxF))}")
  if not jnp.issubdtype(jnp.result_type(w1_DxF), jnp.floating):
    raise ValueError(f"{op}: w1 must have a floating dtype, got {jnp.result_type(w1_DxF)}")
  return config.group_size(w1_DxF.shape[1])


# ----------------------------------------------------------------------------------------------------------------------
# Balanced k-means on W1's columns.


def _sq_distances(cols_FxD: jax.Array, centroids_ExD: jax.Array) -> jax.Array:
  """Squared L2 distances (F, E) in float32."""
  cc = jnp.sum(centroids_ExD * centroids_ExD, axis=1)
  ww = jnp.sum(cols_FxD * cols_FxD, axis=1)
  cross = jnp.dot(cols_FxD, centroids_ExD.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(ww[:, None] - 2.0 * cross + cc[None, :], 0.0)


def balanced_assign(dist_FxE: jax.Array, capacity: int) -> jax.Array:
  """Balanced assignment of F items to E groups of exactly ``capacity`` (greedy regret; see the module docstring).

  Args:
    dist_FxE: float (F, E) costs (squared distances); F must equal E * capacity.
    capacity: items per group.

  Returns:
    int32 (F,) group of each item; every group receives exactly ``capacity`` items.
  """
  F, E = dist_FxE.shape
  if F != E * capacity:
    raise ValueError(f"balanced_assign: F={F} must equal E*capacity={E}*{capacity}")
  d = dist_FxE.astype(jnp.float32)
  big = jnp.float32(jnp.inf)
  group_ids = jnp.arange(E, dtype=jnp.int32)

  def fill_one(_, carry):
    assigned_F, open_E = carry
    free_F = assigned_F < 0
    nearest_F = jnp.argmin(jnp.where(open_E[None, :], d, big), axis=1)
    demand_E = jnp.zeros((E,), jnp.float32).at[nearest_F].add(free_F.astype(jnp.float32))
    g = jnp.argmax(jnp.where(open_E, demand_E, -1.0)).astype(jnp.int32)
    others_F = jnp.min(jnp.where((open_E & (group_ids != g))[None, :], d, big), axis=1)
    regret_F = jnp.where(free_F, d[:, g] - others_F, big)
    _, take = jax.lax.top_k(-regret_F, capacity)
    return assigned_F.at[take].set(g), open_E.at[g].set(False)

  assigned = jnp.full((F,), -1, jnp.int32)
  open_groups = jnp.ones((E,), bool)
  assigned, open_groups = jax.lax.fori_loop(0, E - 1, fill_one, (assigned, open_groups))
  last = jnp.argmax(open_groups).astype(jnp.int32)
  return jnp.where(assigned < 0, last, assigned)


@functools.partial(jax.jit, static_argnums=(1,))
def _kmeanspp_init(cols_FxD: jax.Array, E: int, key: jax.Array) -> jax.Array:
  F, D = cols_FxD.shape
  k0, key = jax.random.split(key)
  first = cols_FxD[jax.random.randint(k0, (), 0, F)]
  cents = jnp.zeros((E, D), jnp.float32).at[0].set(first)
  d2 = _sq_distances(cols_FxD, first[None])[:, 0]

  def pick(j, carry):
    cents, d2 = carry
    logits = jnp.log(jnp.maximum(d2, 1e-30))
    idx = jax.random.categorical(jax.random.fold_in(key, j), logits)
    c = cols_FxD[idx]
    return cents.at[j].set(c), jnp.minimum(d2, _sq_distances(cols_FxD, c[None])[:, 0])

  cents, _ = jax.lax.fori_loop(1, E, pick, (cents, d2))
  return cents


@functools.partial(jax.jit, static_argnums=(2, 3))
def _lloyd(cols_FxD: jax.Array, centroids_ExD: jax.Array, capacity: int, iters: int):
  E = centroids_ExD.shape[0]

  def step(_, cents):
    assign = balanced_assign(_sq_distances(cols_FxD, cents), capacity)
    return jax.ops.segment_sum(cols_FxD, assign, num_segments=E) / capacity

  cents = jax.lax.fori_loop(0, iters, step, centroids_ExD)
  assign = balanced_assign(_sq_distances(cols_FxD, cents), capacity)
  # Centroids consistent with the final assignment (what the tokens are routed against).
  cents = jax.ops.segment_sum(cols_FxD, assign, num_segments=E) / capacity
  return cents, assign


def _state_from(cents_ExD, assign_F, capacity, step):
  E = cents_ExD.shape[0]
  perm = jnp.argsort(assign_F, stable=True).astype(jnp.int32)  # group-major, ascending neuron index inside a group
  sizes = jnp.full((E,), capacity, jnp.int32)
  return RouterState(cents_ExD.astype(jnp.float32), perm, sizes, jnp.asarray(step, jnp.int32))


def router_init(w1_DxF: jax.Array, config: RouterConfig, key: jax.Array) -> RouterState:
  """Clusters W1's columns (k-means++ then ``config.kmeans_iters`` balanced Lloyd iterations).

  Args:
    w1_DxF: (D, F) first FFN weight (columns are neurons).
    config: :class:`RouterConfig`.
    key: PRNG key for the k-means++ initialisation.

  Returns:
    :class:`RouterState` with ``step = 0``.

  Raises:
    ValueError: w1 is not a floating (D, F) array, or F does not split into E groups of a multiple of ``block``.
  """
  capacity = _check_w1("router_init", w1_DxF, config)
  cols = jax.lax.stop_gradient(w1_DxF).T.astype(jnp.float32)
  cents = _kmeanspp_init(cols, config.num_groups, key)
  cents, assign = _lloyd(cols, cents, capacity, config.kmeans_iters)
  return _state_from(cents, assign, capacity, 0)


def router_recluster(state: RouterState, w1_DxF: jax.Array, config: RouterConfig) -> RouterState:
  """Re-clusters W1's columns, warm-started from the current centroids (``step`` is kept).

  Raises:
    ValueError: as :func:`router_init`, or the state has a different number of groups than the config.
  """
  capacity = _check_w1("router_recluster", w1_DxF, config)
  if state.num_groups != config.num_groups:
    raise ValueError(f"router_recluster: state has {state.num_groups} groups, config.num_groups={config.num_groups}")
  cols = jax.lax.stop_gradient(w1_DxF).T.astype(jnp.float32)
  cents, assign = _lloyd(cols, state.centroids_ExD.astype(jnp.float32), capacity, max(config.kmeans_iters, 1))
  return _state_from(cents, assign, capacity, state.step)


def router_update(state: RouterState, w1_DxF: jax.Array, config: RouterConfig) -> RouterState:
  """One training step of router bookkeeping: ``step += 1``, re-clustering when ``step % recluster_every == 0``.

  Call it once per optimizer step (jit-friendly: the re-clustering is a ``lax.cond``). With ``recluster_every=0`` it
  only counts steps.
  """
  _check_w1("router_update", w1_DxF, config)
  step = state.step + 1
  state = dataclasses.replace(state, step=step)
  if config.recluster_every == 0:
    return state
  return jax.lax.cond(step % config.recluster_every == 0,
                      lambda s: router_recluster(s, w1_DxF, config), lambda s: s, state)


# ----------------------------------------------------------------------------------------------------------------------
# Keeping the FFN weights in router order.


def take_neurons(w: jax.Array, perm_F: jax.Array, axis: int) -> jax.Array:
  """``w`` with its neuron axis reordered: ``take(w, perm_F, axis)``.

  Use axis=1 for W1 (D, F) and its optimizer moments, axis=0 for W2 (F, D) and its moments. Permuting hidden neurons
  (W1's columns together with W2's rows) leaves the FFN's function unchanged, and element-wise optimizers (Adam, SGD)
  are permutation-equivariant, so training continues exactly as before the move.
  """
  return jnp.take(w, perm_F, axis=axis)


def settle_permutation(state: RouterState) -> tuple[RouterState, jax.Array]:
  """For models that keep W1/W2 in router order (``routed_ffn(..., weights_grouped=True)``).

  Call it right after :func:`router_init` / :func:`router_recluster` (both cluster the columns in the order they are
  given, so ``state.perm_F`` is relative to the current storage order). Returns the state with an identity
  permutation and the permutation to apply now with :func:`take_neurons` to W1's columns, W2's rows and every
  optimizer moment of the same shapes. This replaces two weight gathers per step (and two in the backward) by one
  re-layout per re-clustering.
  """
  F = state.perm_F.shape[0]
  return dataclasses.replace(state, perm_F=jnp.arange(F, dtype=jnp.int32)), state.perm_F


# ----------------------------------------------------------------------------------------------------------------------
# Tokens.


def neuron_groups(state: RouterState) -> jax.Array:
  """int32 (F,): the group of each neuron, in W1's original column order."""
  F = state.perm_F.shape[0]
  size = F // state.num_groups
  return jnp.zeros((F,), jnp.int32).at[state.perm_F].set(jnp.arange(F, dtype=jnp.int32) // size)


def route_tokens(x: jax.Array, state: RouterState, config: RouterConfig) -> jax.Array:
  """int32 (...,): the group of every token of ``x`` (..., D), by ``config.token_rule``; no gradient.

  Raises:
    ValueError: x's last axis does not match the centroids' D.
  """
  D = state.centroids_ExD.shape[1]
  if jnp.ndim(x) < 1 or x.shape[-1] != D:
    raise ValueError(f"route_tokens: x must have last axis D={D}, got shape {tuple(jnp.shape(x))}")
  x = jax.lax.stop_gradient(x)
  cents = state.centroids_ExD
  # Scores in float32 from bf16 inputs (a [T, D] x [D, E] product: negligible next to the FFN).
  scores = jnp.einsum("...d,ed->...e", x, cents.astype(x.dtype), preferred_element_type=jnp.float32)
  if config.token_rule == "l2":
    scores = 2.0 * scores - jnp.sum(cents * cents, axis=1)
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def captured_mass(x: jax.Array, w1_DxF: jax.Array, state: RouterState, groups: jax.Array) -> jax.Array:
  """Fraction of the dense squared-ReLU activation mass inside each token's assigned group (float32 scalar).

  ``sum_t sum_{f in group(t)} relu(x_t . w_f)^2 / sum_t sum_f relu(x_t . w_f)^2``: 1.0 means routing drops nothing.
  Computes the dense pre-activation, so it is a diagnostic (run it every few hundred steps, not every step).

  Args:
    x: (..., D) tokens. w1_DxF: (D, F). state: :class:`RouterState`. groups: int (...,) from :func:`route_tokens`.
  """
  x2 = x.reshape(-1, x.shape[-1])
  g = groups.reshape(-1)
  y = jnp.dot(x2, w1_DxF, preferred_element_type=jnp.float32)
  mass = jnp.square(jax.nn.relu(y))
  inside = neuron_groups(state)[None, :] == g[:, None]
  total = jnp.sum(mass)
  return jnp.where(total > 0, jnp.sum(jnp.where(inside, mass, 0.0)) / total, 1.0)
