"""Runs the transformations on a simulated 8-device mesh; used by test_sharding.

Run in its own process with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(``tests/test_sharding.py`` does, one process per check), so the rest of the
suite keeps one device: ``python tests/_sharded_steps.py CHECK`` runs one
check of ``CHECKS`` and prints what it measured as one line of JSON; the test
process makes the assertions. A check's result has

* ``close``: for each comparison, the largest ``|got - want| / (atol + rtol
  |want|)`` over the entries (``rtol=1e-5``, ``atol=1e-6``): at most 1 passes;
* ``misplaced``: the arrays whose sharding is not the expected one;
* ``error``: an exception raised by the check (a forbidden host transfer
  among them), else ``None``;
* numbers a check also reports (``params_like_state``: how many params-shaped
  trees the state holds; ``gap_to_global``: how far m-sharpness lands from the
  global perturbation).

The checks:

* every transformation, run for a few jitted steps with the batch sharded over
  ``"data"`` (an 8-device mesh) and, on a 4x2 ``("data", "model")`` mesh, the
  kernels also split over ``"model"``, equals the one-device run;
* on the 8-device mesh, params, updates and state are left to ``jit``: the
  state and the updates come out replicated like the (replicated) params;
* on the 4x2 mesh the state is placed as docs/guides/sharding.rst says
  (``jax.jit(tx.init, out_shardings=...)`` with shardings from
  ``optax.tree.map_params``) and the step pins its outputs: updates and
  params-shaped state have the params' shardings, the rest is replicated;
* left to ``jit`` on the 4x2 mesh, per-layer arrays still come out replicated
  and the state of each kernel takes the kernel's sharding;
* no step moves data between host and device (``jax.transfer_guard``);
* ``layer_sam(axis_name="data")`` inside ``jax.shard_map`` (m-sharpness)
  equals a NumPy reference of per-shard perturbations, on the 8-device mesh
  and on the 4x2 mesh with only ``"data"`` manual, and differs from the
  global perturbation.
"""

import contextlib
import functools
import json
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _layer_sam_reference import layer_sam_step
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_lgm

TRANSFORMS = {
  "scale_by_lgm": lambda: optax.chain(optax_lgm.scale_by_lgm(), optax.sgd(0.1)),
  "scale_by_lgm_temporal": lambda: optax.chain(
    optax_lgm.scale_by_lgm(variance="temporal", layers="module"), optax.sgd(0.1)
  ),
  "dgs": lambda: optax_lgm.dgs(0.01),
  "dgs_layer_ema": lambda: optax_lgm.dgs(0.01, reduction="layer", importance_decay=0.9),
  # layers="module": two layers, "hidden" (0) and "out" (1).
  "layer_sam": lambda: optax_lgm.layer_sam(optax.sgd(0.1, momentum=0.9), 0.1, k=1),
  "layer_sam_static": lambda: optax_lgm.layer_sam(
    optax.sgd(0.1, momentum=0.9), 0.1, k=1
  ),
  "sam_keep_top_k_layers": lambda: optax.contrib.sam(
    optax.sgd(0.1, momentum=0.9),
    optax.chain(
      optax_lgm.keep_top_k_layers(1), optax.contrib.normalize(), optax.sgd(0.1)
    ),
    opaque_mode=True,
    reset_state=False,
  ),
}
# Extra arguments of update: grad_fn for the SAM variants, a static selection.
TAKES_GRAD_FN = ("layer_sam", "layer_sam_static", "sam_keep_top_k_layers")
SELECTION = {"layer_sam_static": (0,)}
STEPS = 3


def make_problem():
  rng = np.random.default_rng(0)
  params = {
    "hidden": {
      "kernel": jnp.asarray(rng.normal(size=(8, 16)) * 0.3, jnp.float32),
      "bias": jnp.zeros(16, jnp.float32),
    },
    "out": {
      "kernel": jnp.asarray(rng.normal(size=(16, 4)) * 0.3, jnp.float32),
      "bias": jnp.zeros(4, jnp.float32),
    },
  }
  x = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)
  return params, x, y


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return jnp.mean(jnp.square(h @ params["out"]["kernel"] + params["out"]["bias"] - y))


def make_step(name, tx, param_shardings=None, out_shardings=None):
  """A jitted step returning ``(params, state, updates)``.

  ``param_shardings`` pins the params' layout inside the step, as users do;
  ``out_shardings`` pins every output.
  """
  kwargs = {}
  if name in SELECTION:
    kwargs["selection"] = SELECTION[name]

  def step(params, state, x, y):
    grad_fn = jax.grad(lambda p, _: loss_fn(p, x, y))
    extra = dict(kwargs, grad_fn=grad_fn) if name in TAKES_GRAD_FN else kwargs
    updates, state = tx.update(grad_fn(params, 0), state, params, **extra)
    params = optax.apply_updates(params, updates)
    if param_shardings is not None:
      params = jax.lax.with_sharding_constraint(params, param_shardings)
    return params, state, updates

  return jax.jit(step, out_shardings=out_shardings)


def run(step, params, state, x, y):
  """``STEPS`` steps; returns the last ``(params, state, updates)``.

  No step moves data between host and device. The first may copy inputs
  between devices (a state made by ``tx.init`` outside ``jit`` holds its
  per-layer arrays on one device); later steps move nothing at all.
  """
  for i in range(STEPS):
    with contextlib.ExitStack() as guards:
      if i:
        guards.enter_context(jax.transfer_guard("disallow"))
      else:
        guards.enter_context(jax.transfer_guard_host_to_device("disallow"))
        guards.enter_context(jax.transfer_guard_device_to_host("disallow"))
      params, state, updates = step(params, state, x, y)
  return params, state, updates


def param_specs(model_axis):
  """Kernels split over the model axis (when there is one), biases replicated."""
  kernel = P(None, model_axis) if model_axis else P()
  return {
    "hidden": {"kernel": kernel, "bias": P()},
    "out": {"kernel": P(model_axis, None) if model_axis else P(), "bias": P()},
  }


def _is_params_like(node):
  return isinstance(node, dict) and set(node) == {"hidden", "out"}


def split_state(state):
  """(params-shaped subtrees, other arrays) of a state."""
  nodes = jax.tree.leaves(state, is_leaf=_is_params_like)
  trees = [n for n in nodes if _is_params_like(n)]
  others = [n for n in nodes if not _is_params_like(n)]
  return trees, others


RTOL, ATOL = 1e-5, 1e-6


def closeness(got, want) -> float:
  """The largest ``|got - want| / (ATOL + RTOL |want|)``; at most 1 is close."""
  worst = 0.0
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert g.shape == w.shape, (g.shape, w.shape)
    if g.size:
      worst = max(worst, float(np.max(np.abs(g - w) / (ATOL + RTOL * np.abs(w)))))
  return worst


def not_like_params(tree, shardings, what) -> list[str]:
  """The leaves of ``tree`` whose sharding is not that of the params."""
  return [
    f"{what}: {leaf.shape} has {leaf.sharding}, not {sharding}"
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))
    if not leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
  ]


def not_replicated(leaves, what) -> list[str]:
  """The arrays among ``leaves`` that are not fully replicated."""
  return [
    f"{what}: {leaf.shape} has {leaf.sharding}, not replicated"
    for leaf in leaves
    if not leaf.sharding.is_fully_replicated
  ]


def state_shardings(tx, params, param_shardings, replicated):
  """The recipe of docs/guides/sharding.rst, through optax.tree.map_params."""
  return optax.tree.map_params(
    tx,
    lambda _, sharding: sharding,
    jax.eval_shape(tx.init, params),
    param_shardings,
    transform_non_params=lambda _: replicated,
  )


def check(name, want):
  """The sharded runs of ``name`` against ``want``, the one-device run."""
  params, x, y = make_problem()
  tx = TRANSFORMS[name]()
  close, misplaced = {}, []

  def same(got, what):
    for g, w, part in zip(got, want, ("params", "state", "updates")):
      close[f"{what}: {part}"] = closeness(g, w)

  # 8-device data mesh, layouts left to jit: params replicated, so are the
  # updates and the whole state.
  mesh = Mesh(np.array(jax.devices()), ("data",))
  data = NamedSharding(mesh, P("data"))
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(None))
  sharded = jax.device_put(params, shardings)
  xs, ys = jax.device_put((x, y), data)
  got = run(make_step(name, tx, shardings), sharded, tx.init(sharded), xs, ys)
  same(got, "8 devices")
  misplaced += not_like_params(got[0], shardings, "8 devices: params")
  misplaced += not_like_params(got[2], shardings, "8 devices: updates")
  misplaced += not_replicated(jax.tree.leaves(got[1]), "8 devices: state")

  # 4x2 data x model mesh, state placed and outputs pinned as documented.
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs("model"))
  sharded = jax.device_put(params, shardings)
  xs, ys = jax.device_put((x, y), data)
  placement = state_shardings(tx, params, shardings, replicated)
  state = jax.jit(tx.init, out_shardings=placement)(sharded)
  step = make_step(name, tx, out_shardings=(shardings, placement, shardings))
  got = run(step, sharded, state, xs, ys)
  same(got, "4x2 devices")
  misplaced += not_like_params(got[0], shardings, "4x2 devices: params")
  misplaced += not_like_params(got[2], shardings, "4x2 devices: updates")
  trees, others = split_state(got[1])
  for tree in trees:
    misplaced += not_like_params(tree, shardings, "4x2 devices: params-like state")
  misplaced += not_replicated(jax.tree.leaves(others), "4x2 devices: per-layer state")
  return {"close": close, "misplaced": misplaced, "params_like_state": len(trees)}


def check_unpinned_layout(name):
  """On the 4x2 mesh with only the params pinned, what jit gives the state."""
  params, x, y = make_problem()
  tx = TRANSFORMS[name]()
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
  specs = param_specs("model")
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  sharded = jax.device_put(params, shardings)
  xs, ys = jax.device_put((x, y), NamedSharding(mesh, P("data")))
  _, state, updates = run(
    make_step(name, tx, shardings), sharded, tx.init(sharded), xs, ys
  )
  trees, others = split_state(state)
  # Kernels: state and updates take the kernel's sharding. (jit may also
  # split the state of a replicated bias over "model": not checked.)
  misplaced = []
  for i, tree in enumerate([updates, *trees]):
    what = "updates" if i == 0 else f"params-like state {i}"
    for layer in ("hidden", "out"):
      misplaced += not_like_params(
        tree[layer]["kernel"],
        NamedSharding(mesh, specs[layer]["kernel"]),
        f"{what}: {layer}/kernel",
      )
  misplaced += not_replicated(jax.tree.leaves(others), "per-layer state")
  return {"close": {}, "misplaced": misplaced, "params_like_state": len(trees)}


# --------------------------------------------------------------------------
# m-sharpness: layer_sam(axis_name="data") inside jax.shard_map.
# --------------------------------------------------------------------------

M_RHO, M_LR = 0.5, 0.1


def np_grad(w, x, y):
  """The gradient of ``loss_fn`` in NumPy (float64)."""
  z = x @ w["hidden"]["kernel"] + w["hidden"]["bias"]
  h = np.tanh(z)
  d_pred = 2 * (h @ w["out"]["kernel"] + w["out"]["bias"] - y) / y.size
  d_z = (d_pred @ w["out"]["kernel"].T) * (1 - h * h)
  return {
    "hidden": {"kernel": x.T @ d_z, "bias": d_z.sum(0)},
    "out": {"kernel": h.T @ d_pred, "bias": d_pred.sum(0)},
  }


def np_layer_sam(w, x, y, shards, steps):
  """``layer_sam(sgd(M_LR), M_RHO, k=1)`` with ``shards`` per-shard perturbations.

  The shards of the batch are a whole batch divided by the number of
  devices, and ``np_grad`` is a mean over examples, so each shard's loss is
  the mean over its own examples, as on the devices.
  """
  batches = list(zip(np.split(x, shards), np.split(y, shards)))
  for _ in range(steps):
    w, _, _ = layer_sam_step(w, batches, np_grad, k=1, rho=M_RHO, lr=M_LR)
  return w


def m_sharpness_step(tx, mesh, manual_axes):
  def local(params, state, x, y):
    grad_fn = jax.grad(lambda p, _: loss_fn(p, x, y))
    # The gradient at replicated params would come back summed over "data":
    # take this shard's own at params marked as varying.
    grads = grad_fn(jax.lax.pcast(params, "data", to="varying"), 0)
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state, updates

  return jax.jit(
    jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(P(), P(), P("data"), P("data")),
      out_specs=(P(), P(), P()),
      axis_names=manual_axes,
    )
  )


def check_m_sharpness():
  params, x, y = make_problem()
  w = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
  xn, yn = np.asarray(x, np.float64), np.asarray(y, np.float64)
  tx_global = optax_lgm.layer_sam(optax.sgd(M_LR), M_RHO, k=1)
  tx = optax_lgm.layer_sam(optax.sgd(M_LR), M_RHO, k=1, axis_name="data")

  # The reference itself: one shard is the global perturbation.
  global_run = run(
    make_step("layer_sam", tx_global), params, tx_global.init(params), x, y
  )
  want_global = np_layer_sam(w, xn, yn, shards=1, steps=STEPS)
  close = {"global perturbation: params": closeness(global_run[0], want_global)}

  # 8 devices, batch over "data".
  mesh = Mesh(np.array(jax.devices()), ("data",))
  data = NamedSharding(mesh, P("data"))
  xs, ys = jax.device_put((x, y), data)
  sharded = jax.device_put(params, NamedSharding(mesh, P()))
  got = run(m_sharpness_step(tx, mesh, {"data"}), sharded, tx.init(sharded), xs, ys)
  want = np_layer_sam(w, xn, yn, shards=8, steps=STEPS)
  close["8 devices: params"] = closeness(got[0], want)
  gap = max(
    float(np.max(np.abs(a - b)))
    for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(global_run[0]))
  )
  # The state and the step's selection are the same on every device.
  close["8 devices: selected_count"] = closeness(
    got[1].selected_count, global_run[1].selected_count
  )

  # 4x2 mesh: "data" manual (4 shards), kernels split over "model" by jit.
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs("model"))
  sharded = jax.device_put(params, shardings)
  xs, ys = jax.device_put((x, y), NamedSharding(mesh, P("data")))
  got = run(m_sharpness_step(tx, mesh, {"data"}), sharded, tx.init(sharded), xs, ys)
  want = np_layer_sam(w, xn, yn, shards=4, steps=STEPS)
  close["4x2 devices: params"] = closeness(got[0], want)
  return {"close": close, "misplaced": [], "gap_to_global": gap}


def check_transform(name):
  """``name`` on both meshes against its one-device run."""
  params, x, y = make_problem()
  tx = TRANSFORMS[name]()
  return check(name, run(make_step(name, tx), params, tx.init(params), x, y))


CHECKS = {
  **{name: functools.partial(check_transform, name) for name in TRANSFORMS},
  **{
    f"unpinned_layout {name}": functools.partial(check_unpinned_layout, name)
    for name in ("dgs_layer_ema", "layer_sam")
  },
  "m_sharpness": check_m_sharpness,
}
"""Every check, by name: ``python tests/_sharded_steps.py NAME`` runs one."""


def main(argv):
  """Runs the check named in ``argv``; prints its result as one line of JSON."""
  (name,) = argv
  if jax.device_count() != 8:
    result = {"error": f"{jax.device_count()} devices, not 8: {jax.devices()}"}
  else:
    try:
      result = {**CHECKS[name](), "error": None}
    except Exception:  # noqa: BLE001  # Reported to the test, which fails.
      result = {"error": traceback.format_exc()}
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
