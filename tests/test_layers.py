"""Tests of the layer grouping shared by every transformation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_lgm
from optax_lgm import _layers, _reductions, _selection


def dense_tree():
  return {
    "dense1": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)},
    "dense2": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
    "scale": jnp.ones(1),
  }


def test_leaf_and_module_names_on_dict():
  tree = dense_tree()
  assert optax_lgm.layer_names(tree) == (
    "dense1/bias",
    "dense1/kernel",
    "dense2/bias",
    "dense2/kernel",
  )
  assert optax_lgm.layer_names(tree, "module") == ("dense1", "dense2")


def test_size_one_none_and_integer_leaves_carry_no_statistic():
  tree = {"a": jnp.ones(3), "one": jnp.ones(1), "none": None, "ints": jnp.ones(4, int)}
  lay = _layers.LayerSpec()(tree)
  assert lay.names == ("a",)
  flat = lay.flatten(tree)
  assert sum(ids is not None for ids in lay.leaf_layers) == 1
  assert len(flat) == 4


def test_callable_layers_and_mask():
  tree = dense_tree()
  lay = _layers.LayerSpec(lambda path, leaf: "all" if leaf.ndim == 2 else None)(tree)
  assert lay.names == ("all",)
  np.testing.assert_array_equal(lay.sizes, [12 + 6])
  masked = _layers.LayerSpec(mask=lambda t: jax.tree.map(lambda x: x.ndim == 2, t))(
    tree
  )
  assert masked.names == ("dense1/kernel", "dense2/kernel")


class _NnxMlp(nnx.Module):
  def __init__(self, rngs):
    self.dense1 = nnx.Linear(4, 3, rngs=rngs)
    self.norm = nnx.BatchNorm(3, rngs=rngs)
    self.dense2 = nnx.Linear(3, 2, rngs=rngs)


def test_nnx_paths_same_names_with_and_without_value():
  model = _NnxMlp(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  names = optax_lgm.layer_names(state, "module")
  assert names == ("dense1", "dense2", "norm")
  # nnx.Optimizer hands tx.update a State of plain arrays: same layering.
  grads = nnx.grad(lambda m: jnp.sum(m.dense2(m.dense1(jnp.ones((1, 4))))))(model)
  assert optax_lgm.layer_names(grads, "module")[:2] == ("dense1", "dense2")
  assert optax_lgm.layer_names(state) == optax_lgm.layer_names(
    jax.tree.map(jnp.zeros_like, nnx.to_pure_dict(state))
  )


def test_linen_module_names():
  class Mlp(linen.Module):
    @linen.compact
    def __call__(self, x):
      return linen.Dense(2, name="head")(linen.relu(linen.Dense(3, name="body")(x)))

  params = Mlp().init(jax.random.key(0), jnp.ones((1, 4)))
  assert optax_lgm.layer_names(params, "module") == ("params/body", "params/head")
  assert len(optax_lgm.layer_names(params)) == 4


def test_layer_axes_split_stacked_leaves():
  tree = {"blocks": {"kernel": jnp.ones((3, 4, 4)), "bias": jnp.ones((3, 4))}}
  names = optax_lgm.layer_names(tree, "module", layer_axes=1)
  assert names == ("blocks[0]", "blocks[1]", "blocks[2]")
  lay = _layers.LayerSpec("module", layer_axes=1)(tree)
  np.testing.assert_array_equal(lay.sizes, [20, 20, 20])


def test_layer_axes_larger_than_rank_raises():
  with pytest.raises(ValueError, match="layer_axes.*bias"):
    _layers.LayerSpec(layer_axes=2)({"bias": jnp.ones(3)})


@pytest.mark.parametrize("bad", ["leaves", "Module", 3])
def test_unknown_layers_raises(bad):
  with pytest.raises(ValueError, match=f"layers=.*{bad!r}"):
    _layers.LayerSpec(bad)({"a": jnp.ones(2)})


def test_mask_with_wrong_structure_raises():
  with pytest.raises(ValueError, match="mask"):
    _layers.LayerSpec(mask={"a": True})({"a": jnp.ones(2), "b": jnp.ones(2)})


def _numpy_moments(groups):
  return [(np.mean(g), np.var(g)) for g in groups]


def test_moments_match_numpy_module_and_stacked():
  rng = np.random.default_rng(0)
  tree = {
    "m": {"kernel": rng.normal(3.0, 0.01, (3, 5, 4)), "bias": rng.normal(size=(3, 4))},
    "solo": rng.normal(size=(7,)),
  }
  tree = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  lay = _layers.LayerSpec(
    "module", layer_axes=lambda path, leaf: 1 if leaf.ndim > 1 else 0
  )(tree)
  assert lay.names == ("m[0]", "m[1]", "m[2]", "solo")
  mean, var = _reductions.moments(lay, tree)
  groups = [
    np.concatenate([np.ravel(tree["m"]["bias"][i]), np.ravel(tree["m"]["kernel"][i])])
    for i in range(3)
  ] + [np.asarray(tree["solo"])]
  for (m, v), got_m, got_v in zip(_numpy_moments(groups), mean, var):
    np.testing.assert_allclose(got_m, m, rtol=1e-5)
    np.testing.assert_allclose(got_v, v, rtol=1e-3)


def test_moments_constant_layer_is_exactly_zero():
  tree = {"a": jnp.full((10, 10), 1e4), "b": jnp.full((3,), -2.5)}
  _, var = _reductions.moments(_layers.LayerSpec()(tree), tree)
  np.testing.assert_array_equal(var, [0.0, 0.0])


def test_sums_and_map():
  tree = {"a": jnp.arange(4.0), "b": jnp.ones((2, 2)) * 2}
  lay = _layers.LayerSpec(lambda path, leaf: "one")(tree)
  np.testing.assert_allclose(_reductions.sums(lay, jnp.square, tree), [14.0 + 16.0])
  out = lay.map(lambda x, s: x * s, tree, per_layer=[jnp.array([3.0])])
  chex.assert_trees_all_close(out, jax.tree.map(lambda x: 3 * x, tree))


def test_top_k():
  values = jnp.array([0.1, 3.0, 2.0, 5.0])
  np.testing.assert_array_equal(_selection.top_k(values, 2), [0, 1, 0, 1])
  np.testing.assert_array_equal(_selection.top_k(values, None), [1, 1, 1, 1])


@settings(max_examples=25, deadline=None)
@given(
  shapes=st.lists(
    st.tuples(st.integers(2, 5), st.integers(1, 4)), min_size=1, max_size=4
  ),
  seed=st.integers(0, 1000),
)
def test_moments_property(shapes, seed):
  """Per-leaf moments equal NumPy's for any shapes (hypothesis)."""
  rng = np.random.default_rng(seed)
  tree = [jnp.asarray(rng.normal(rng.normal(), 2.0, s), jnp.float32) for s in shapes]
  mean, var = _reductions.moments(_layers.LayerSpec()(tree), tree)
  np.testing.assert_allclose(mean, [np.mean(x) for x in tree], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(var, [np.var(x) for x in tree], rtol=1e-3, atol=1e-5)


# --------------------------------------------------------------------------
# optax.tree.map_params on the states that carry LayerNames.
# --------------------------------------------------------------------------


def test_optax_map_params_keeps_names_inside_optax_sam():
  # The names of keep_top_k_layers survive inside optax.contrib.sam's state
  # (the contract suite checks map_params on every transformation alone).
  tx = optax.contrib.sam(
    optax.sgd(0.1),
    optax.chain(
      optax_lgm.keep_top_k_layers(1), optax.contrib.normalize(), optax.sgd(0.05)
    ),
    opaque_mode=True,
    reset_state=False,
  )
  params = dense_tree()
  state = tx.init(params)
  doubled = optax.tree.map_params(tx, lambda p: 2 * p + 1, state)
  assert jax.tree.structure(doubled) == jax.tree.structure(state)
  assert optax_lgm.layer_stats(doubled).keys() == optax_lgm.layer_stats(state).keys()
  chex.assert_trees_all_equal(doubled.adv_state, state.adv_state)


def test_optax_tree_get_per_layer_field():
  params = dense_tree()
  tx = optax_lgm.layer_sam(optax.sgd(0.1, momentum=0.9), k=1, layers="leaf")
  state = tx.init(params)
  grad_fn = jax.grad(lambda p, _: sum(jnp.sum(x**3) for x in jax.tree.leaves(p)))
  _, state = tx.update(grad_fn(params, 0), state, params, grad_fn=grad_fn)
  # dense1/kernel (12 entries) has the largest norm.
  np.testing.assert_array_equal(optax.tree.get(state, "selected_count"), [0, 1, 0, 0])
  lgm_state = optax_lgm.lgm(0.1).init(params)
  np.testing.assert_array_equal(optax.tree.get(lgm_state, "alpha"), np.zeros(4))
