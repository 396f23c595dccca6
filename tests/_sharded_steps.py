"""Runs the transformations on a simulated 8-device mesh; used by test_sharding.

Run in its own process with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(``tests/test_sharding.py`` does, one process per check), so the rest of the
suite keeps one device: ``python tests/_sharded_steps.py [CHECK ...]`` runs
the named checks of ``CHECKS`` (every check without a name), prints
``ok <check>`` for each that passed, and exits non-zero with the failing
check and its message.

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
import sys

import chex
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
  "dgs_layer_ema": lambda: optax_lgm.dgs(
    0.01, reduction="layer", importance_decay=0.9
  ),
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


def assert_like_params(tree, shardings, what):
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (
      what,
      leaf.shape,
      leaf.sharding,
      sharding,
    )


def assert_replicated(leaves, what):
  for leaf in leaves:
    assert leaf.sharding.is_fully_replicated, (what, leaf.shape, leaf.sharding)


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
  """The sharded runs of ``name`` equal ``want``, the one-device run."""
  params, x, y = make_problem()
  tx = TRANSFORMS[name]()

  def same(got, what):
    for g, w, part in zip(got, want, ("params", "state", "updates")):
      try:
        chex.assert_trees_all_close(g, w, rtol=1e-5, atol=1e-6)
      except AssertionError as e:
        raise AssertionError(f"{name} on {what}: {part} differ") from e

  # 8-device data mesh, layouts left to jit: params replicated, so are the
  # updates and the whole state.
  mesh = Mesh(np.array(jax.devices()), ("data",))
  data = NamedSharding(mesh, P("data"))
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(None))
  sharded = jax.device_put(params, shardings)
  xs, ys = jax.device_put((x, y), data)
  got = run(make_step(name, tx, shardings), sharded, tx.init(sharded), xs, ys)
  same(got, "8 devices")
  assert_like_params(got[0], shardings, (name, "params"))
  assert_like_params(got[2], shardings, (name, "updates"))
  assert_replicated(jax.tree.leaves(got[1]), (name, "state"))

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
  assert_like_params(got[0], shardings, (name, "params"))
  assert_like_params(got[2], shardings, (name, "updates"))
  trees, others = split_state(got[1])
  assert trees or name in ("scale_by_lgm", "dgs"), (name, "no params-like state")
  for tree in trees:
    assert_like_params(tree, shardings, (name, "params-like state"))
  assert_replicated(jax.tree.leaves(others), (name, "per-layer state"))


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
  assert trees, name
  # Kernels: state and updates take the kernel's sharding. (jit may also
  # split the state of a replicated bias over "model": not checked.)
  for tree in [updates, *trees]:
    for layer in ("hidden", "out"):
      leaf, spec = tree[layer]["kernel"], specs[layer]["kernel"]
      assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), 2), (
        name,
        layer,
        leaf.sharding,
      )
  assert_replicated(jax.tree.leaves(others), (name, "per-layer state"))


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
  chex.assert_trees_all_close(global_run[0], want_global, rtol=1e-5, atol=1e-6)

  # 8 devices, batch over "data".
  mesh = Mesh(np.array(jax.devices()), ("data",))
  data = NamedSharding(mesh, P("data"))
  xs, ys = jax.device_put((x, y), data)
  sharded = jax.device_put(params, NamedSharding(mesh, P()))
  got = run(m_sharpness_step(tx, mesh, {"data"}), sharded, tx.init(sharded), xs, ys)
  want = np_layer_sam(w, xn, yn, shards=8, steps=STEPS)
  chex.assert_trees_all_close(got[0], want, rtol=1e-5, atol=1e-6)
  gap = max(
    float(np.max(np.abs(a - b)))
    for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(global_run[0]))
  )
  assert gap > 1e-3, ("m-sharpness equals the global perturbation", gap)
  # The state and the step's selection are the same on every device.
  chex.assert_trees_all_close(got[1].selected_count, global_run[1].selected_count)

  # 4x2 mesh: "data" manual (4 shards), kernels split over "model" by jit.
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs("model"))
  sharded = jax.device_put(params, shardings)
  xs, ys = jax.device_put((x, y), NamedSharding(mesh, P("data")))
  got = run(m_sharpness_step(tx, mesh, {"data"}), sharded, tx.init(sharded), xs, ys)
  want = np_layer_sam(w, xn, yn, shards=4, steps=STEPS)
  chex.assert_trees_all_close(got[0], want, rtol=1e-5, atol=1e-6)


def check_transform(name):
  """``name`` on both meshes equals its one-device run."""
  params, x, y = make_problem()
  tx = TRANSFORMS[name]()
  check(name, run(make_step(name, tx), params, tx.init(params), x, y))


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
  """Runs the checks named in ``argv`` (all without), each failure named."""
  assert jax.device_count() == 8, jax.devices()
  for name in argv or list(CHECKS):
    try:
      CHECKS[name]()
    except AssertionError as e:
      cause = f"\n{e.__cause__}" if e.__cause__ else ""
      print(f"FAILED {name}: {e}{cause}", file=sys.stderr)
      return 1
    print(f"ok {name}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
