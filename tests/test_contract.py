"""One body of checks run over every public transformation of the library.

Add a transformation by adding an entry to ``REGISTRY``: its factory, the
keyword arguments that build it, which of them are numeric hyperparameters
(injected with ``optax.inject_hyperparams``), a learning rate that converges
on the small problem below, and whether ``update`` needs a ``grad_fn``.
"""

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lgm


@dataclasses.dataclass(frozen=True)
class Entry:
  name: str
  factory: Callable[..., optax.GradientTransformation]
  kwargs: dict
  numeric: tuple[str, ...] = ()
  # Learning rate of the SGD that follows a bare ``scale_by_*``; ``None`` for
  # a ready optimizer that has its own.
  learning_rate: float | None = 0.1
  needs_grad_fn: bool = False
  # Whether the transformation alone keeps its state on a non-finite gradient.
  nan_safe: bool = True
  # The final loss must fall below this fraction of the initial loss.
  target: float = 0.3

  def __str__(self) -> str:
    return self.name


def ready(*args, **kwargs) -> Entry:
  """An entry for an optimizer with its own learning rate (no SGD after it)."""
  return Entry(*args, learning_rate=None, **kwargs)


REGISTRY = [
  Entry(
    "scale_by_lgm",
    optax_lgm.scale_by_lgm,
    {},
    ("beta", "eps", "power", "min_scale", "max_scale"),
    target=0.65,
  ),
  # The paper's literal rule: alpha ~ 1 / Var(g) is unstable at any learning
  # rate that makes fast progress (3e-5 already diverges here), hence the
  # loose target.
  Entry(
    "scale_by_lgm_literal",
    optax_lgm.scale_by_lgm,
    dict(power=1.0, normalize=None, eps=1e-8, min_scale=None, max_scale=None),
    ("beta", "eps", "power"),
    learning_rate=1e-5,
    target=0.95,
  ),
  Entry(
    "scale_by_lgm_temporal_module",
    optax_lgm.scale_by_lgm,
    dict(variance="temporal", layers="module", normalize="mean", max_scale=10.0),
    ("beta", "eps", "power", "max_scale"),
    target=0.65,
  ),
  ready(
    "lgm",
    optax_lgm.lgm,
    dict(learning_rate=0.05, weight_decay=1e-4),
    ("learning_rate", "beta", "weight_decay"),
    nan_safe=False,
    target=0.65,
  ),
  # The defaults: weight_decay=0 is a number here and an array when injected.
  ready(
    "lgm_defaults",
    optax_lgm.lgm,
    dict(learning_rate=0.05),
    ("learning_rate", "momentum", "weight_decay"),
    nan_safe=False,
    target=0.65,
  ),
  Entry("scale_by_dgs", optax_lgm.scale_by_dgs, {}, ("beta", "sigma"), 3.0),
  Entry(
    "scale_by_dgs_layer",
    optax_lgm.scale_by_dgs,
    dict(reduction="layer", importance_decay=0.9),
    ("beta", "sigma", "importance_decay"),
    1.0,
    target=0.4,
  ),
  Entry(
    "scale_by_dgs_element",
    optax_lgm.scale_by_dgs,
    dict(reduction="element", gamma=2.0),
    ("beta", "sigma", "gamma"),
    0.02,
  ),
  ready(
    "dgs",
    optax_lgm.dgs,
    dict(learning_rate=0.01),
    ("learning_rate", "momentum", "weight_decay", "beta", "sigma"),
    nan_safe=False,
  ),
  ready(
    "dgs_paper_sum_no_momentum",
    optax_lgm.dgs,
    dict(learning_rate=3.0, momentum=None, denominator="sum", weight_decay=1e-4),
    ("learning_rate", "weight_decay"),
    nan_safe=False,
  ),
  ready(
    "layer_sam",
    optax_lgm.layer_sam,
    dict(optimizer=optax.sgd(0.1, momentum=0.9), rho=0.05, k=2),
    ("rho", "k", "eta", "eps", "norm_decay"),
    needs_grad_fn=True,
  ),
  ready(
    "layer_sam_leaf_recompute_adaptive_global",
    optax_lgm.layer_sam,
    dict(
      optimizer=optax.sgd(0.1, momentum=0.9),
      rho=0.5,
      k=1,
      layers="leaf",
      normalize="global",
      unselected="recompute",
      adaptive=True,
    ),
    ("rho", "k", "eta"),
    needs_grad_fn=True,
  ),
  ready(
    "layer_sam_every_layer_rho_schedule",
    optax_lgm.layer_sam,
    dict(
      optimizer=optax.adam(0.05),
      rho=optax.linear_schedule(0.0, 0.1, 50),
      k=None,
    ),
    ("rho",),
    needs_grad_fn=True,
  ),
  # Perturbation schedules: the second pass under lax.cond. LookSAM's reuse
  # adds a stale direction of norm 0.7 |g| at skipped steps, hence the target.
  ready(
    "layer_sam_every_3_orthogonal",
    optax_lgm.layer_sam,
    dict(optimizer=optax.sgd(0.1, momentum=0.9), k=1, every=3, skipped="orthogonal"),
    ("rho", "every", "orthogonal_scale"),
    needs_grad_fn=True,
    target=0.35,
  ),
  ready(
    "layer_sam_random",
    optax_lgm.layer_sam,
    dict(
      optimizer=optax.sgd(0.1, momentum=0.9),
      k=None,
      unselected="recompute",
      schedule="random",
      probability=0.5,
      seed=3,
    ),
    ("rho", "probability", "seed"),
    needs_grad_fn=True,
  ),
  ready(
    "layer_sam_adaptive_schedule",
    optax_lgm.layer_sam,
    dict(
      optimizer=optax.sgd(0.1, momentum=0.9),
      k=2,
      schedule="adaptive",
      threshold=optax.linear_schedule(-1.0, 1.0, 150),
      skipped="orthogonal",
    ),
    ("rho", "threshold_decay", "orthogonal_scale"),
    needs_grad_fn=True,
  ),
  Entry(
    "keep_top_k_layers",
    optax_lgm.keep_top_k_layers,
    dict(k=1),
    ("k",),
    learning_rate=0.5,
    target=0.4,
  ),
]


def build(
  entry: Entry, inject: bool = False, **overrides
) -> optax.GradientTransformation:
  factory = optax.inject_hyperparams(entry.factory) if inject else entry.factory
  tx = factory(**{**entry.kwargs, **overrides})
  if entry.learning_rate is not None:
    tx = optax.chain(tx, optax.sgd(entry.learning_rate))
  return tx


# A two-layer MLP regression: layers of clearly different gradient scales.
_rng = np.random.default_rng(0)
_X = jnp.asarray(_rng.normal(size=(32, 4)), jnp.float32)
_Y = jnp.asarray(_rng.normal(size=(32, 3)), jnp.float32)


def make_params(dtype=jnp.float32) -> dict:
  rng = np.random.default_rng(1)
  return {
    "dense1": {
      "kernel": jnp.asarray(rng.normal(size=(4, 8)) * 0.5, dtype),
      "bias": jnp.zeros(8, dtype),
    },
    "dense2": {
      "kernel": jnp.asarray(rng.normal(size=(8, 3)) * 0.5, dtype),
      "bias": jnp.zeros(3, dtype),
    },
  }


def loss_fn(params: dict) -> jax.Array:
  h = jnp.tanh(_X.astype(params["dense1"]["kernel"].dtype) @ params["dense1"]["kernel"])
  h = h + params["dense1"]["bias"]
  out = h @ params["dense2"]["kernel"] + params["dense2"]["bias"]
  return jnp.mean(jnp.square(out.astype(jnp.float32) - _Y))


def extra_args(entry: Entry, loss: Callable = loss_fn) -> dict:
  if not entry.needs_grad_fn:
    return {}
  return {"grad_fn": jax.grad(lambda p, _: loss(p))}


def run_steps(tx, params, steps: int, entry: Entry, jit: bool = True):
  state = tx.init(params)

  def step(params, state):
    grads = jax.grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params, **extra_args(entry))
    return optax.apply_updates(params, updates), state, updates

  if jit:
    step = jax.jit(step)
  updates = None
  for _ in range(steps):
    params, state, updates = step(params, state)
  return params, state, updates


parametrize = pytest.mark.parametrize("entry", REGISTRY, ids=str)


@parametrize
def test_jit_matches_no_jit(entry):
  tx = build(entry)
  p1, s1, u1 = run_steps(tx, make_params(), 3, entry, jit=True)
  p2, s2, u2 = run_steps(tx, make_params(), 3, entry, jit=False)
  chex.assert_trees_all_close(u1, u2, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(p1, p2, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(s1, s2, rtol=1e-5, atol=1e-6)


@parametrize
def test_no_recompilation(entry):
  chex.clear_trace_counter()
  tx = build(entry)
  params = make_params()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state):
    grads = jax.grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params, **extra_args(entry))
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(3):
    params, state = step(params, state)
  chex.assert_tree_all_finite(params)


@parametrize
def test_none_leaves(entry):
  tx = build(entry)
  params = {**make_params(), "frozen": None}

  def loss(p):
    return loss_fn({k: v for k, v in p.items() if k != "frozen"})

  grads = {**jax.grad(loss_fn)(make_params()), "frozen": None}
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params, **extra_args(entry, loss))
  assert updates["frozen"] is None
  chex.assert_tree_all_finite(updates["dense1"])


@parametrize
def test_empty_tree(entry):
  tx = build(entry)
  state = tx.init({})
  extra = {"grad_fn": lambda p, _: {}} if entry.needs_grad_fn else {}
  updates, _ = tx.update({}, state, {}, **extra)
  assert updates == {}


@parametrize
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes_preserved_and_state_stable(entry, dtype):
  tx = build(entry)
  params = make_params(dtype)
  state = tx.init(params)
  grads = jax.grad(loss_fn)(params)
  updates, new_state = tx.update(grads, state, params, **extra_args(entry))
  chex.assert_trees_all_equal_dtypes(updates, params)
  chex.assert_trees_all_equal_structs(new_state, state)
  chex.assert_trees_all_equal_dtypes(new_state, state)
  chex.assert_trees_all_equal_shapes(new_state, state)


def inner_state(entry: Entry, state: Any) -> Any:
  """The state of the transformation itself, inside ``build``'s chain."""
  return state[0] if entry.learning_rate is not None else state


@parametrize
def test_inject_hyperparams(entry):
  plain = build(entry)
  injected = build(entry, inject=True)
  s1, s2 = plain.init(make_params()), injected.init(make_params())
  chex.assert_trees_all_equal_structs(
    inner_state(entry, s2).inner_state, inner_state(entry, s1)
  )
  _, s1, u1 = run_steps(plain, make_params(), 3, entry)
  _, s2, u2 = run_steps(injected, make_params(), 3, entry)
  chex.assert_trees_all_close(u1, u2, rtol=1e-5, atol=1e-6)
  # One structure and the same values: a state saved from one restores into
  # the other.
  chex.assert_trees_all_close(
    inner_state(entry, s2).inner_state, inner_state(entry, s1), rtol=1e-5, atol=1e-6
  )
  hyper = inner_state(entry, s2).hyperparams
  assert set(entry.numeric) <= set(hyper), (entry.numeric, hyper.keys())


@parametrize
def test_multi_steps(entry):
  tx = optax.MultiSteps(build(entry), every_k_schedule=2)
  params = make_params()
  state = tx.init(params)
  step = jax.jit(
    lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p, **extra_args(entry))
  )
  updates, state = step(params, state)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, updates))
  updates, state = step(params, state)
  assert optax.tree.norm(updates) > 0
  chex.assert_tree_all_finite(updates)


def _nan_grads(params):
  grads = jax.grad(loss_fn)(params)
  return jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads)


@pytest.mark.parametrize("entry", [e for e in REGISTRY if e.nan_safe], ids=str)
def test_nan_step_handed_on_by_apply_if_finite_changes_nothing(entry):
  # With max_consecutive_errors=0, optax.apply_if_finite hands every
  # non-finite gradient to the transformation: only the transformation's own
  # guard keeps its state. The step after it must be the step that would
  # have come without it.
  tx = optax.apply_if_finite(build(entry), max_consecutive_errors=0)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, **extra_args(entry)))
  params = make_params()
  grads = jax.grad(loss_fn)(params)
  _, state = step(grads, tx.init(params), params)
  updates, nan_state = step(_nan_grads(params), state, params)
  assert not np.isfinite(np.asarray(updates["dense1"]["kernel"])).all()
  chex.assert_trees_all_equal(nan_state.inner_state, state.inner_state)
  after_nan, _ = step(grads, nan_state, params)
  without_nan, _ = step(grads, state, params)
  chex.assert_trees_all_close(after_nan, without_nan, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("entry", [e for e in REGISTRY if e.nan_safe], ids=str)
def test_nonfinite_gradient_leaves_own_state(entry):
  tx = entry.factory(**entry.kwargs)
  params = make_params()
  state = tx.init(params)
  _, state = tx.update(jax.grad(loss_fn)(params), state, params, **extra_args(entry))
  _, new_state = tx.update(_nan_grads(params), state, params, **extra_args(entry))
  chex.assert_trees_all_equal(new_state, state)


@parametrize
def test_optax_map_params(entry):
  tx = build(entry)
  params = make_params()
  state = tx.init(params)
  structure = jax.tree.structure(params)

  def is_params(x):
    return jax.tree.structure(x) == structure

  # Maps over the params-shaped parts only; the layer names survive.
  doubled = optax.tree.map_params(tx, lambda p: 2 * p + 1, state)
  assert jax.tree.structure(doubled) == jax.tree.structure(state)
  for before, after in zip(
    jax.tree.leaves(state, is_leaf=is_params),
    jax.tree.leaves(doubled, is_leaf=is_params),
  ):
    want = jax.tree.map(lambda p: 2 * p + 1, before) if is_params(before) else before
    chex.assert_trees_all_equal(after, want)
  for node in jax.tree.leaves(doubled, is_leaf=lambda x: hasattr(x, "names")):
    if hasattr(node, "names"):
      assert type(node.names) is optax_lgm.LayerNames
      assert node.names.names

  # The pattern of optax's docstring: shardings for the state from the
  # params' shardings, used as jit's out_shardings.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = optax.tree.map_params(
    tx,
    lambda _, s: s,
    jax.eval_shape(tx.init, params),
    jax.tree.map(lambda _: replicated, params),
    transform_non_params=lambda _: replicated,
  )
  placed = jax.jit(tx.init, out_shardings=shardings)(params)
  chex.assert_trees_all_equal(placed, state)


@parametrize
def test_converges(entry):
  tx = build(entry)
  params = make_params()
  initial = float(loss_fn(params))
  params, _, _ = run_steps(tx, params, 150, entry)
  final = float(loss_fn(params))
  assert np.isfinite(final)
  assert final < entry.target * initial, (initial, final)


def public_transformations() -> list[Any]:
  """Every public factory annotated to return a gradient transformation."""
  out = []
  for name in optax_lgm.__all__:
    obj = getattr(optax_lgm, name)
    if inspect.isfunction(obj):
      ret = inspect.signature(obj).return_annotation
      if isinstance(ret, type) and issubclass(ret, optax.GradientTransformation):
        out.append(obj)
  return out


def test_registry_covers_every_public_transformation():
  public = public_transformations()
  assert optax_lgm.scale_by_lgm in public and optax_lgm.dgs in public
  covered = {e.factory for e in REGISTRY}
  missing = [f.__name__ for f in public if f not in covered]
  assert not missing, missing
