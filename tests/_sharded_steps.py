"""Runs the transformations on a simulated 8-device mesh; used by test_sharding.

Run in its own process with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(``tests/test_sharding.py`` does), so the rest of the suite keeps one device.
Exits non-zero, with the failing check named, when a check fails.
"""

import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_lgm

TRANSFORMS = {
  "scale_by_lgm": lambda: optax.chain(optax_lgm.scale_by_lgm(), optax.sgd(0.1)),
  "scale_by_lgm_temporal": lambda: optax.chain(
    optax_lgm.scale_by_lgm(variance="temporal", layers="module"), optax.sgd(0.1)
  ),
  "dgs": lambda: optax_lgm.dgs(3.0),
  "dgs_layer_ema": lambda: optax_lgm.dgs(
    1.0, reduction="layer", importance_decay=0.9, momentum=0.9
  ),
}


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


def train(tx, params, x, y, steps=4, shardings=None):
  """A few jitted steps; ``shardings`` pins the parameters' layout, as users do."""
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    if shardings is not None:
      params = jax.lax.with_sharding_constraint(params, shardings)
    return params, state

  for _ in range(steps):
    params, state = step(params, state, x, y)
  return params, state


def param_specs(model_axis):
  """Kernels split over the model axis (when there is one), biases replicated."""
  kernel = P(None, model_axis) if model_axis else P()
  return {
    "hidden": {"kernel": kernel, "bias": P()},
    "out": {"kernel": P(model_axis, None) if model_axis else P(), "bias": P()},
  }


def check(name, mesh_shape, axis_names):
  params, x, y = make_problem()
  tx = TRANSFORMS[name]()
  want_params, want_state = train(tx, params, x, y)

  mesh = Mesh(np.array(jax.devices()).reshape(mesh_shape), axis_names)
  model_axis = "model" if "model" in axis_names else None
  specs = param_specs(model_axis)
  sharded = jax.tree.map(
    lambda p, s: jax.device_put(p, NamedSharding(mesh, s)), params, specs
  )
  data = NamedSharding(mesh, P("data"))
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  got_params, got_state = train(
    tx, sharded, jax.device_put(x, data), jax.device_put(y, data), shardings=shardings
  )
  chex.assert_trees_all_close(got_params, want_params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(got_state, want_state, rtol=1e-5, atol=1e-6)

  # The parameters keep their (pinned) layout and the update needs no
  # resharding of its own to get there.
  for p, spec in zip(jax.tree.leaves(got_params), jax.tree.leaves(specs)):
    assert p.sharding.is_equivalent_to(NamedSharding(mesh, spec), p.ndim), name
  # tx.init on sharded params: per-element state mirrors the params' layout.
  state = tx.init(sharded)
  for tree in _per_element_trees(state):
    for p, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(specs)):
      assert p.sharding.is_equivalent_to(NamedSharding(mesh, spec), p.ndim), (
        name,
        p.shape,
        p.sharding,
      )


def _per_element_trees(state):
  """The sub-trees of a state shaped like the params (mu, importance, trace)."""
  return [
    node
    for node in jax.tree.leaves(state, is_leaf=lambda n: isinstance(n, dict))
    if isinstance(node, dict) and set(node) == {"hidden", "out"}
  ]


def main():
  assert jax.device_count() == 8, jax.devices()
  for name in TRANSFORMS:
    check(name, (8,), ("data",))
    check(name, (4, 2), ("data", "model"))
    print(f"ok {name}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
