"""Tests of optax_lgm.layer_sam, keep_top_k_layers and select_layers."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _layer_sam_reference import layer_sam_step
from flax import nnx

import optax_lgm
from optax_lgm import _selection

# --------------------------------------------------------------------------
# A small model with layers of clearly different gradient norms, and its
# gradient in NumPy (float64) for the reference.
#
# Layers (``layers="module"``): a = {bias, kernel}, b, c, d. The prediction is
# tanh(X @ theta) with theta the concatenation of the leaves; the columns of X
# that feed each layer are scaled so the layers' gradient norms differ.
# --------------------------------------------------------------------------

SHAPES = {
  "a": {"bias": (2,), "kernel": (3, 2)},
  "b": {"kernel": (4,)},
  "c": {"kernel": (2, 3)},
  "d": {"kernel": (5,)},
}
LAYER_SCALE = {"a": 0.6, "b": 5.0, "c": 0.2, "d": 2.5}
LEAVES = [(m, name) for m in sorted(SHAPES) for name in sorted(SHAPES[m])]
SIZES = [int(np.prod(SHAPES[m][n])) for m, n in LEAVES]
_rng = np.random.default_rng(0)
X = _rng.normal(size=(16, sum(SIZES))) * np.concatenate(
  [np.full(s, LAYER_SCALE[m]) for (m, _), s in zip(LEAVES, SIZES)]
)
Y = _rng.normal(size=16) * 0.5


def init_params(dtype=jnp.float32) -> dict:
  rng = np.random.default_rng(1)
  return {
    m: {n: jnp.asarray(rng.normal(size=s) * 0.3, dtype) for n, s in leaves.items()}
    for m, leaves in SHAPES.items()
  }


def batch_loss(params: dict, x, y) -> jax.Array:
  theta = jnp.concatenate([params[m][n].ravel() for m, n in LEAVES])
  return 0.5 * jnp.mean(jnp.square(jnp.tanh(x @ theta) - y))


def loss(params: dict, i=0) -> jax.Array:
  del i
  return batch_loss(params, X, Y)


grad_fn = jax.grad(loss)


def np_batch_grad(w: dict, x: np.ndarray, y: np.ndarray) -> dict:
  theta = np.concatenate([w[m][n].ravel() for m, n in LEAVES])
  t = np.tanh(x @ theta)
  g = x.T @ ((t - y) * (1 - t * t)) / len(y)
  out, i = {}, 0
  for (m, n), s in zip(LEAVES, SIZES):
    out.setdefault(m, {})[n] = g[i : i + s].reshape(SHAPES[m][n])
    i += s
  return out


def np_grad(w: dict) -> dict:
  return np_batch_grad(w, X, Y)


def np_layer_sam_step(w, batches=((X, Y),), **hyper):
  """The shared NumPy reference on this model (one batch: global)."""
  return layer_sam_step(w, list(batches), np_batch_grad, **hyper)


def jit_step(tx):
  @functools.partial(jax.jit, static_argnames="selection")
  def step(params, state, selection=None):
    grads = grad_fn(params)
    updates, state = tx.update(
      grads, state, params, grad_fn=grad_fn, selection=selection
    )
    return optax.apply_updates(params, updates), state, updates

  return step


def opaque_step(tx):
  """A jitted step of any optimizer that takes ``grad_fn`` (ours or optax's)."""

  @jax.jit
  def step(params, state):
    updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  return step


# --------------------------------------------------------------------------
# The algorithm.
# --------------------------------------------------------------------------


def test_layer_norms_differ():
  g = np_grad(jax.tree.map(np.asarray, init_params()))
  norms = sorted(np.sqrt(sum(np.sum(v**2) for v in g[m].values())) for m in g)
  assert all(b > 1.5 * a for a, b in zip(norms, norms[1:])), norms


@pytest.mark.parametrize(
  "normalize,unselected,adaptive",
  list(
    itertools.product(("selected", "global"), ("reuse", "recompute"), (False, True))
  ),
)
def test_matches_numpy_reference(normalize, unselected, adaptive):
  hyper = dict(k=2, rho=0.3, normalize=normalize, unselected=unselected)
  hyper.update(adaptive=adaptive, eta=0.05)
  tx = optax_lgm.layer_sam(optax.sgd(0.1), **hyper)
  step = jit_step(tx)
  params = init_params()
  state = tx.init(params)
  w = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  counts = np.zeros(4, int)
  for _ in range(4):
    params, state, _ = step(params, state)
    w, norms, sel = np_layer_sam_step(w, lr=0.1, **hyper)
    counts += sel
    chex.assert_trees_all_close(params, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.grad_norm, norms, rtol=1e-5)
    np.testing.assert_array_equal(state.selected, sel.astype(np.int32))
    np.testing.assert_array_equal(state.selected_count, counts)
  assert int(state.count) == 4


def assert_same_trajectory(ours, ref, steps):
  """Runs both opaque-mode transformations ``steps`` steps from `init_params`,
  checking that the parameters agree after each; returns the two states."""
  step1, step2 = opaque_step(ours), opaque_step(ref)
  p1 = p2 = init_params()
  s1, s2 = ours.init(p1), ref.init(p2)
  for _ in range(steps):
    p1, s1 = step1(p1, s1)
    p2, s2 = step2(p2, s2)
    chex.assert_trees_all_close(p1, p2, rtol=1e-5, atol=1e-7)
  return s1, s2


@pytest.mark.parametrize("k", [None, 4])
def test_every_layer_is_sam(k):
  rho = 0.2
  opt = optax.sgd(0.3, momentum=0.9)
  ours = optax_lgm.layer_sam(opt, rho, k, unselected="recompute")
  ref = optax.contrib.sam(
    opt, optax.chain(optax.contrib.normalize(), optax.sgd(rho)), opaque_mode=True
  )

  assert_same_trajectory(ours, ref, steps=5)


def test_keep_top_k_layers_inside_optax_sam_is_layer_sam():
  rho, k = 0.2, 2
  opt = optax.sgd(0.3, momentum=0.9)
  adv = optax.chain(
    optax_lgm.keep_top_k_layers(k), optax.contrib.normalize(), optax.sgd(rho)
  )
  ref = optax.contrib.sam(opt, adv, opaque_mode=True, reset_state=False)
  ours = optax_lgm.layer_sam(opt, rho, k, unselected="recompute")

  s1, s2 = assert_same_trajectory(ours, ref, steps=4)
  top_k = optax_lgm.layer_stats(s2)
  assert (
    top_k["top_k_selected_count"] == optax_lgm.layer_stats(s1)["sam_selected_count"]
  )


def test_keep_top_k_layers_zeros_the_rest():
  grads = {
    "big": jnp.array([3.0, 4.0]),
    "small": jnp.array([0.1, 0.1]),
    "scalar": jnp.array([9.0]),  # Size 1: no statistic, never selected.
    "none": None,
  }
  tx = optax_lgm.keep_top_k_layers(1, layers="leaf")
  updates, state = tx.update(grads, tx.init(grads))
  np.testing.assert_array_equal(updates["big"], grads["big"])
  np.testing.assert_array_equal(updates["small"], 0.0)
  np.testing.assert_array_equal(updates["scalar"], 0.0)
  assert updates["none"] is None
  assert optax_lgm.layer_stats(state)["top_k_selected"] == {"big": 1, "small": 0}


@pytest.mark.parametrize(
  "schedule, perturbed",
  [
    ({}, 5),
    ({"every": 2, "skipped": "plain"}, 3),
    ({"every": 2, "skipped": "orthogonal"}, 3),
  ],
)
def test_static_mode_equals_dynamic_mode(schedule, perturbed):
  tx = optax_lgm.layer_sam(optax.sgd(0.5, momentum=0.9), 0.3, k=2, **schedule)
  step = jit_step(tx)
  p_dyn = p_sta = init_params()
  s_dyn = s_sta = tx.init(p_dyn)
  for _ in range(5):
    p_dyn, s_dyn, u_dyn = step(p_dyn, s_dyn)
    # The selection that dynamic mode made at this step, as a static tuple.
    selection = tuple(int(i) for i in np.flatnonzero(s_dyn.selected))
    p_sta, s_sta, u_sta = step(p_sta, s_sta, selection=selection)
    chex.assert_trees_all_close(u_sta, u_dyn, rtol=1e-6, atol=1e-8)
    chex.assert_trees_all_close(s_sta, s_dyn, rtol=1e-6, atol=1e-8)
  assert int(s_sta.perturbed_count) == perturbed
  # Names are accepted as well as indices.
  names = optax_lgm.layer_names(init_params(), "module")
  by_index = step(p_sta, s_sta, selection=(1, 3))
  by_name = step(p_sta, s_sta, selection=(names[1], names[3]))
  chex.assert_trees_all_equal(by_index, by_name)


def test_stacked_layers_static_equals_dynamic():
  # layer_axes=1 on "stack": its three rows are three layers; a static
  # selection may take some rows of the leaf and not others.
  scales = jnp.array([[0.5], [3.0], [1.0]])
  params = {"head": jnp.full(4, 0.2), "stack": jnp.ones((3, 4)) * 0.3}

  def stacked_loss(p, i=0):
    h = jnp.tanh(p["stack"] * scales).sum(0)
    return jnp.sum(jnp.square(h * p["head"] - 1.0))

  g_fn = jax.grad(stacked_loss)
  seen = []

  def recording(p, i):
    seen.append(p)
    return g_fn(p, i)

  tx = optax_lgm.layer_sam(
    optax.sgd(0.1), 0.5, k=2, layers="leaf", layer_axes={"head": 0, "stack": 1}
  )
  assert optax_lgm.layer_names(params, "leaf", layer_axes={"head": 0, "stack": 1}) == (
    "head",
    "stack[0]",
    "stack[1]",
    "stack[2]",
  )
  state = tx.init(params)
  u_dyn, s_dyn = tx.update(g_fn(params), state, params, grad_fn=g_fn)
  selection = tuple(int(i) for i in np.flatnonzero(s_dyn.selected))
  assert selection == (0, 2)  # head and stack[1].
  u_sta, s_sta = tx.update(
    g_fn(params), state, params, grad_fn=recording, selection=selection
  )
  chex.assert_trees_all_close(u_sta, u_dyn, rtol=1e-6)
  chex.assert_trees_all_close(s_sta, s_dyn, rtol=1e-6)
  (adv,) = seen
  np.testing.assert_array_equal(adv["stack"][np.array([0, 2])], params["stack"][::2])
  assert not np.allclose(adv["stack"][1], params["stack"][1])


def test_static_mode_perturbs_only_the_selection():
  seen = []

  def recording_grad_fn(params, i):
    seen.append(params)
    return grad_fn(params, i)

  params = init_params()
  tx = optax_lgm.layer_sam(optax.sgd(0.1), 0.3, k=2)
  tx.update(
    grad_fn(params), tx.init(params), params, grad_fn=recording_grad_fn, selection=(1,)
  )  # Layer 1 is "b".
  (adv,) = seen
  for m in ("a", "c", "d"):
    for n in SHAPES[m]:
      assert adv[m][n] is params[m][n]  # Not w + 0: the very same array.
  assert not np.allclose(adv["b"]["kernel"], params["b"]["kernel"])


def test_static_mode_prunes_the_second_pass():
  # A deep trunk under a cheap head: perturbing only the head must cost about
  # one SGD step (XLA drops the unused second-pass gradients and shares the
  # trunk's forward pass); dynamic mode costs about two.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(256, 64)), jnp.float32)
  params = {
    f"dense{i}": {"kernel": jnp.asarray(rng.normal(size=(64, 64)) / 8, jnp.float32)}
    for i in range(3)
  }
  params["head"] = {"kernel": jnp.asarray(rng.normal(size=(64, 2)) / 8, jnp.float32)}

  def mlp_loss(p, i=0):
    h = x
    for j in range(3):
      h = jnp.tanh(h @ p[f"dense{j}"]["kernel"])
    return jnp.mean(jnp.square(h @ p["head"]["kernel"]))

  g_fn = jax.grad(mlp_loss)
  tx = optax_lgm.layer_sam(optax.sgd(0.1), k=1)

  def step(p, s, selection=None):
    return tx.update(g_fn(p), s, p, grad_fn=g_fn, selection=selection)

  def flops(f, *args, **kwargs):
    compiled = (
      jax.jit(f, static_argnames=tuple(kwargs)).lower(*args, **kwargs).compile()
    )
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]

  state = tx.init(params)
  head = optax_lgm.layer_names(params, "module").index("head")
  sgd = flops(lambda p: optax.sgd(0.1).update(g_fn(p), optax.sgd(0.1).init(p)), params)
  dynamic = flops(step, params, state)
  static = flops(step, params, state, selection=(head,))
  assert dynamic > 1.8 * sgd, (sgd, dynamic)
  assert static < 1.15 * sgd, (sgd, static)


def test_reselection_loop_compiles_once_per_selection():
  # The batch alternates which layer has the largest gradient, so that the
  # selection alternates too; each distinct selection compiles once.
  traces = []
  tx = optax_lgm.layer_sam(optax.sgd(0.05), 0.1, k=1, layers="leaf")

  @functools.partial(jax.jit, static_argnames="selection")
  def step(params, state, scale, selection=None):
    traces.append(selection)
    g_fn = jax.grad(lambda p, _: scale * jnp.sum(p["u"] ** 2) + jnp.sum(p["v"] ** 2))
    updates, state = tx.update(
      g_fn(params, 0), state, params, grad_fn=g_fn, selection=selection
    )
    return optax.apply_updates(params, updates), state

  params = {"u": jnp.ones(3), "v": jnp.ones(3)}
  state = tx.init(params)
  selection, selections = None, []
  for i in range(13):
    if i % 3 == 1:
      selection = optax_lgm.select_layers(state, by="last")
      selections.append(selection)
    scale = 4.0 if (i // 3) % 2 else 0.25
    params, state = step(params, state, scale, selection=selection)
  assert selections == [(1,), (0,), (1,), (0,)]
  assert len(traces) == 1 + len(set(selections)) == 3


# --------------------------------------------------------------------------
# State, diagnostics and host-side selection.
# --------------------------------------------------------------------------


def test_diagnostics_by_layer_name():
  tx = optax_lgm.layer_sam(optax.sgd(0.1), k=2)
  step = jit_step(tx)
  params, state = init_params(), tx.init(init_params())
  for _ in range(3):
    params, state, _ = step(params, state)
  stats = optax_lgm.layer_stats(state)
  assert set(stats) == {
    "sam_grad_norm",
    "sam_grad_norm_avg",
    "sam_selected",
    "sam_selected_count",
    "sam_perturbed_steps",
  }
  assert set(stats["sam_grad_norm"]) == {"a", "b", "c", "d"}
  assert sum(stats["sam_selected"].values()) == 2
  assert sum(stats["sam_selected_count"].values()) == 6
  # b and d have the largest norms (LAYER_SCALE).
  assert stats["sam_selected_count"]["b"] == stats["sam_selected_count"]["d"] == 3
  chex.assert_type(
    [state.grad_norm, state.grad_norm_avg, state.selected, state.selected_count],
    [jnp.float32, jnp.float32, jnp.int32, jnp.int32],
  )


def test_running_average_of_norms():
  tx = optax_lgm.layer_sam(optax.sgd(0.1), k=2, norm_decay=0.5)
  step = jit_step(tx)
  params, state = init_params(), tx.init(init_params())
  params, state, _ = step(params, state)
  first = np.asarray(state.grad_norm)
  np.testing.assert_allclose(state.grad_norm_avg, first)  # Seeded.
  params, state, _ = step(params, state)
  np.testing.assert_allclose(
    state.grad_norm_avg, 0.5 * first + 0.5 * np.asarray(state.grad_norm), rtol=1e-6
  )


def np_layer_norms(w: dict) -> np.ndarray:
  """Each layer's (module's) first-pass gradient norm at ``w``, float64."""
  g = np_grad(jax.tree.map(lambda v: np.asarray(v, np.float64), w))
  return np.array([np.sqrt(sum(np.sum(v**2) for v in g[m].values())) for m in g])


def test_running_average_of_norms_matches_numpy_reference():
  """``grad_norm_avg`` against a float64 EMA, step by step.

  The schedule skips every other step (whose norms still count), one step has
  a non-finite gradient (``apply_if_finite`` never calls ``layer_sam``), and
  one has a non-finite second pass (``layer_sam`` keeps its state itself).
  """
  decay = 0.7
  tx = optax.apply_if_finite(
    optax_lgm.layer_sam(optax.sgd(0.1), k=2, norm_decay=decay, every=2),
    max_consecutive_errors=10,
  )
  params = init_params()
  state = tx.init(params)
  faults = ["", "", "grads", "second pass", "", "", "", ""]
  avg = None  # The reference: seeded with the first finite step.
  for t, fault in enumerate(faults):
    grads, second = grad_fn(params), grad_fn
    if fault == "grads":
      grads = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads)
    if fault == "second pass":
      second = lambda p, i: jax.tree.map(lambda g: g * jnp.nan, grad_fn(p, i))  # noqa: E731
    updates, state = tx.update(grads, state, params, grad_fn=second)
    if not fault:
      norms = np_layer_norms(params)
      avg = norms if avg is None else decay * avg + (1 - decay) * norms
      params = optax.apply_updates(params, updates)
    sam = state.inner_state
    assert int(sam.count) == sum(not f for f in faults[: t + 1])
    np.testing.assert_allclose(sam.grad_norm_avg, avg, rtol=2e-5, err_msg=f"step {t}")
  assert int(sam.perturbed_count) == 3  # Counts 0, 2 and 4 of 6: every=2.


def test_select_layers_finds_nested_state():
  inner = optax_lgm.layer_sam(optax.sgd(0.1), k=2)
  tx = optax.MultiSteps(
    optax.chain(optax.inject_hyperparams(optax_lgm.layer_sam)(optax.sgd(0.1), k=2)),
    every_k_schedule=1,
  )
  params = init_params()
  for t in (inner, tx):
    _, state = t.update(grad_fn(params), t.init(params), params, grad_fn=grad_fn)
    assert optax_lgm.select_layers(state) == (1, 3)  # b, d.
    assert optax_lgm.select_layers(state, k=1) == (1,)
    assert optax_lgm.select_layers(state, k=3, by="last") == (0, 1, 3)


def test_select_layers_errors():
  with pytest.raises(ValueError, match="LayerSamState"):
    optax_lgm.select_layers(optax.sgd(0.1).init(init_params()))
  tx = optax_lgm.layer_sam(optax.sgd(0.1), k=2)
  fresh = tx.init(init_params())
  for k in (None, 1):  # A state that has taken no step would rank zeros.
    with pytest.raises(ValueError, match="taken a step"):
      optax_lgm.select_layers(fresh, k=k)
  params = init_params()
  _, stepped = tx.update(grad_fn(params), fresh, params, grad_fn=grad_fn)
  with pytest.raises(ValueError, match="k=9"):
    optax_lgm.select_layers(stepped, k=9)
  with pytest.raises(ValueError, match="by"):
    optax_lgm.select_layers(stepped, k=1, by="max")


def test_nonfinite_gradient_keeps_whole_state():
  tx = optax_lgm.layer_sam(optax.sgd(0.1, momentum=0.9), k=2)
  step = jit_step(tx)
  params, state = init_params(), tx.init(init_params())
  params, state, _ = step(params, state)
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grad_fn(params))
  updates, new_state = tx.update(bad, state, params, grad_fn=grad_fn)
  chex.assert_trees_all_equal(new_state, state)
  assert not np.isfinite(np.asarray(updates["a"]["kernel"])).all()

  def nan_grad_fn(p, i):  # Second pass not finite.
    return jax.tree.map(lambda g: g * jnp.nan, grad_fn(p, i))

  _, new_state = tx.update(grad_fn(params), state, params, grad_fn=nan_grad_fn)
  chex.assert_trees_all_equal(new_state, state)


def test_rho_schedule_follows_count():
  opt = optax.sgd(0.1)
  tx = optax_lgm.layer_sam(opt, rho=lambda count: 0.2 * count, k=2)
  params = init_params()
  state = tx.init(params)
  u0, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
  chex.assert_trees_all_close(u0, opt.update(grad_fn(params), opt.init(params))[0])
  fixed = optax_lgm.layer_sam(opt, rho=0.2, k=2)
  u1, _ = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
  u2, _ = fixed.update(grad_fn(params), fixed.init(params), params, grad_fn=grad_fn)
  chex.assert_trees_all_close(u1, u2, rtol=1e-6)


def test_traced_k_ranks_like_top_k():
  values = jnp.array([1.0, 3.0, 3.0, 0.5, 2.0, 3.0])  # Ties.
  ranked = jax.jit(_selection.top_k)
  for k in range(1, 7):
    np.testing.assert_array_equal(
      ranked(values, jnp.asarray(k)), _selection.top_k(values, k)
    )


def test_bf16_params():
  params = init_params(jnp.bfloat16)
  tx = optax_lgm.layer_sam(optax.sgd(0.1), k=2)
  g_fn = jax.grad(lambda p, i=0: loss(jax.tree.map(lambda v: v.astype(jnp.float32), p)))
  for selection in (None, (1, 3)):
    state = tx.init(params)
    updates, new_state = tx.update(
      g_fn(params), state, params, grad_fn=g_fn, selection=selection
    )
    chex.assert_trees_all_equal_dtypes(updates, params)
    chex.assert_trees_all_equal_dtypes(new_state, state)


# --------------------------------------------------------------------------
# Flax NNX with BatchNorm: the second pass must not touch running statistics.
# --------------------------------------------------------------------------


class BatchNormNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.dense1 = nnx.Linear(4, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.5, rngs=rngs)
    self.dense2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.dense2(nnx.relu(self.bn(self.dense1(x))))


def nnx_loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit(static_argnames="selection")
def nnx_train_step(model, optimizer, x, y, selection=None):
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  rest = nnx.as_pure(rest)  # Fresh copies of the statistics for the 2nd pass.

  def second_pass(params, _):  # Its BatchNorm updates are thrown away.
    return jax.grad(lambda p: nnx_loss(nnx.merge(graphdef, p, rest), x, y))(params)

  grads = nnx.grad(nnx_loss)(model, x, y)  # Updates the running statistics.
  optimizer.update(model, grads, grad_fn=second_pass, selection=selection)


@nnx.jit
def nnx_first_pass_only(model, x, y):
  nnx.grad(nnx_loss)(model, x, y)


@pytest.mark.parametrize("selection", [None, (2,)])
def test_nnx_batchnorm_statistics_from_first_pass_only(selection):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
  y = jnp.asarray(np.arange(16) % 3)
  model = BatchNormNet(nnx.Rngs(0))
  reference = nnx.clone(model)
  sgd_model = nnx.clone(model)
  optimizer = nnx.Optimizer(
    model, optax_lgm.layer_sam(optax.sgd(0.5), rho=0.5, k=1), wrt=nnx.Param
  )
  nnx_train_step(model, optimizer, x, y, selection=selection)
  nnx_first_pass_only(reference, x, y)
  chex.assert_trees_all_close(
    nnx.state(model, nnx.BatchStat), nnx.state(reference, nnx.BatchStat), atol=1e-6
  )
  # The statistics did move (momentum 0.5), and SAM changed the step.
  assert not np.allclose(model.bn.mean[...], sgd_model.bn.mean[...])
  sgd_opt = nnx.Optimizer(sgd_model, optax.sgd(0.5), wrt=nnx.Param)
  sgd_opt.update(sgd_model, nnx.grad(nnx_loss)(sgd_model, x, y))
  assert not np.allclose(model.dense2.kernel[...], sgd_model.dense2.kernel[...])
  stats = optax_lgm.layer_stats(optimizer.opt_state)
  assert stats["sam_selected"] == {"bn": 0, "dense1": 0, "dense2": 1}
  assert optax_lgm.select_layers(optimizer.opt_state) == (2,)


# --------------------------------------------------------------------------
# m-sharpness (axis_name): each shard of the batch perturbs with its own
# gradient; selection and the gradient handed on are averaged.
# --------------------------------------------------------------------------


def m_sharpness_local_step(tx, selection=None):
  """The per-shard step: first pass at this shard's data, then layer_sam."""

  def step(params, state, x, y):
    grad_fn = jax.grad(lambda p, _: batch_loss(p, x, y))
    grads = grad_fn(params, 0)
    updates, state = tx.update(
      grads, state, params, grad_fn=grad_fn, selection=selection
    )
    return optax.apply_updates(params, updates), state

  return step


def test_m_sharpness_matches_numpy_reference():
  # Four shards of the batch, mapped with vmap (an axis name, one device).
  rho, k, lr, n_shards = 0.3, 2, 0.1, 4
  tx = optax_lgm.layer_sam(optax.sgd(lr), rho, k, axis_name="shards")
  step = jax.jit(
    jax.vmap(
      m_sharpness_local_step(tx),
      in_axes=(None, None, 0, 0),
      out_axes=None,  # Everything handed on is the same on every shard.
      axis_name="shards",
    )
  )
  xs = X.reshape(n_shards, -1, X.shape[1])
  ys = Y.reshape(n_shards, -1)
  shards = list(zip(xs, ys))
  params = init_params()
  state = tx.init(params)
  w = w_global = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  counts = np.zeros(4, int)
  for _ in range(3):
    params, state = step(params, state, jnp.asarray(xs), jnp.asarray(ys))
    w, norms, sel = np_layer_sam_step(w, shards, k=k, rho=rho, lr=lr)
    w_global, _, _ = np_layer_sam_step(w_global, k=k, rho=rho, lr=lr)
    counts += sel
    chex.assert_trees_all_close(params, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.grad_norm, norms, rtol=1e-5)
    np.testing.assert_array_equal(state.selected_count, counts)
  # Per-shard perturbations are not the global one.
  gap = max(np.max(np.abs(a - b)) for a, b in zip(*map(jax.tree.leaves, (w, w_global))))
  assert gap > 1e-4, gap


@pytest.mark.parametrize("selection", [None, (1, 3)])
def test_m_sharpness_on_one_device_is_global(selection):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  spec = jax.sharding.PartitionSpec
  opt = optax.sgd(0.1, momentum=0.9)
  local = optax_lgm.layer_sam(opt, 0.3, 2, axis_name="data")
  plain = optax_lgm.layer_sam(opt, 0.3, 2)

  def sharded(params, state, x, y):
    # Under shard_map the gradient at the replicated params is summed over
    # the axis: take it at params marked as varying to get this shard's own.
    grad_fn = jax.grad(lambda p, _: batch_loss(p, x, y))
    grads = grad_fn(jax.lax.pcast(params, "data", to="varying"), 0)
    updates, state = local.update(
      grads, state, params, grad_fn=grad_fn, selection=selection
    )
    return optax.apply_updates(params, updates), state

  step_m = jax.jit(
    jax.shard_map(
      sharded,
      mesh=mesh,
      in_specs=(spec(), spec(), spec("data"), spec("data")),
      out_specs=(spec(), spec()),
    )
  )
  step_g = jax.jit(m_sharpness_local_step(plain, selection))
  p_m = p_g = init_params()
  s_m, s_g = local.init(p_m), plain.init(p_g)
  x, y = jnp.asarray(X, jnp.float32), jnp.asarray(Y, jnp.float32)
  for _ in range(3):
    p_m, s_m = step_m(p_m, s_m, x, y)
    p_g, s_g = step_g(p_g, s_g, x, y)
  chex.assert_trees_all_close(p_m, p_g, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(s_m, s_g, rtol=1e-6, atol=1e-7)


def test_keep_top_k_layers_with_axis_name_in_optax_sam():
  # m-sharpness with optax's own SAM: keep_top_k_layers(axis_name=...) keeps
  # the layers of the averaged gradient's top-k norms, each shard perturbs
  # them along its own gradient, and the shards' updates are averaged.
  rho, k, lr, n_shards = 0.3, 2, 0.1, 4
  keep = optax_lgm.keep_top_k_layers(k, axis_name="shards")
  adversarial = optax.chain(keep, optax.contrib.normalize(), optax.sgd(rho))
  tx = optax.contrib.sam(
    optax.sgd(lr), adversarial, opaque_mode=True, reset_state=False
  )

  def local_step(params, state, x, y):
    grad_fn = jax.grad(lambda p, _: batch_loss(p, x, y))
    updates, state = tx.update(grad_fn(params, 0), state, params, grad_fn=grad_fn)
    updates = jax.lax.pmean(updates, "shards")
    return optax.apply_updates(params, updates), state

  step = jax.jit(
    jax.vmap(local_step, in_axes=(None, None, 0, 0), out_axes=None, axis_name="shards")
  )
  xs, ys = X.reshape(n_shards, -1, X.shape[1]), Y.reshape(n_shards, -1)
  shards = list(zip(xs, ys))
  params = init_params()
  state = tx.init(params)
  w = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  counts = np.zeros(4, int)
  for _ in range(3):
    params, state = step(params, state, jnp.asarray(xs), jnp.asarray(ys))
    w, norms, sel = np_layer_sam_step(
      w, shards, k=k, rho=rho, lr=lr, unselected="recompute"
    )
    counts += sel
    chex.assert_trees_all_close(params, w, rtol=1e-5, atol=1e-6)
    keep_state = state.adv_state[0]
    np.testing.assert_allclose(keep_state.grad_norm, norms, rtol=1e-5)
    np.testing.assert_array_equal(keep_state.selected, sel)
    np.testing.assert_array_equal(keep_state.selected_count, counts)


@pytest.mark.parametrize("axis_name", [3, ["data"], ("data", 1), (), b"data"])
def test_bad_axis_name(axis_name):
  with pytest.raises(TypeError, match="axis_name"):
    optax_lgm.layer_sam(optax.sgd(0.1), axis_name=axis_name)
  with pytest.raises(TypeError, match="axis_name"):
    optax_lgm.keep_top_k_layers(2, axis_name=axis_name)


# --------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(k=0), "k must be"),
    (dict(k=-1), "k must be"),
    (dict(k=2.5), "k must be"),
    (dict(k=True), "k must be"),
    (dict(rho=-0.1), "rho"),
    (dict(normalize="all"), "normalize"),
    (dict(unselected="zero"), "unselected"),
    (dict(norm_decay=1.5), "norm_decay"),
    (dict(layers="block"), "layers"),
  ],
)
def test_bad_factory_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optax_lgm.layer_sam(optax.sgd(0.1), **kwargs)


def test_k_larger_than_number_of_layers():
  with pytest.raises(
    ValueError, match=r"k=5 is larger than the number of layers of the params \(4\)"
  ):
    optax_lgm.layer_sam(optax.sgd(0.1), k=5).init(init_params())
  with pytest.raises(ValueError, match="k=5"):
    optax_lgm.keep_top_k_layers(5).init(init_params())
  with pytest.raises(ValueError, match="k must be"):
    optax_lgm.keep_top_k_layers(0)


@pytest.mark.parametrize(
  "selection,match",
  [
    ((0, 4), "index 4, out of range for 4 layers"),
    ((-1,), "index -1, out of range"),
    (("a", "nope"), "'nope'"),
    ((1.0,), "selection must hold"),
    (jnp.array([0, 1]), "static argument"),
    (3, "selection must be"),
  ],
)
def test_bad_selection(selection, match):
  tx = optax_lgm.layer_sam(optax.sgd(0.1), k=2)
  params = init_params()
  with pytest.raises(ValueError, match=match):
    tx.update(
      grad_fn(params), tx.init(params), params, grad_fn=grad_fn, selection=selection
    )


def test_missing_grad_fn_or_params():
  tx = optax_lgm.layer_sam(optax.sgd(0.1), k=2)
  params = init_params()
  with pytest.raises(ValueError, match="needs grad_fn"):
    tx.update(grad_fn(params), tx.init(params), params)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(grad_fn(params), tx.init(params), grad_fn=grad_fn)


def test_grad_fn_with_wrong_structure():
  tx = optax_lgm.layer_sam(optax.sgd(0.1), k=2)
  params = init_params()
  with pytest.raises(ValueError, match="grad_fn's output"):
    tx.update(grad_fn(params), tx.init(params), params, grad_fn=lambda p, i: {"a": 1})
