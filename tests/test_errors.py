"""Bad input raises an error that names the argument and the value.

Each case here used to be accepted silently and to give a wrong optimizer.
"""

import json

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_lgm

PARAMS = {"a": {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}, "c": {"w": jnp.ones(4)}}


def grad_fn(params, _):
  return jax.tree.map(lambda p: 2.0 * p, params)


@pytest.mark.parametrize(
  "factory", [optax_lgm.scale_by_lgm, optax_lgm.scale_by_dgs], ids=lambda f: f.__name__
)
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, "int8"])
def test_integer_stats_dtype(factory, dtype):
  with pytest.raises(TypeError, match="stats_dtype=.*int|stats_dtype=.*bool"):
    factory(stats_dtype=dtype)


@pytest.mark.parametrize("gamma", [-1.0, -1])
def test_negative_gamma(gamma):
  with pytest.raises(ValueError, match=f"gamma={gamma}"):
    optax_lgm.scale_by_dgs(gamma=gamma)
  with pytest.raises(ValueError, match="gamma"):
    optax_lgm.dgs(0.01, gamma=gamma)


def test_negative_gamma_in_a_tree():
  gamma = jax.tree.map(lambda p: -jnp.ones_like(p), PARAMS)
  with pytest.raises(ValueError, match="gamma must be non-negative"):
    optax_lgm.scale_by_dgs(gamma=gamma).init(PARAMS)


def test_min_scale_above_max_scale():
  with pytest.raises(ValueError, match="min_scale=2.0 and max_scale=1.0"):
    optax_lgm.scale_by_lgm(min_scale=2.0, max_scale=1.0)
  with pytest.raises(ValueError, match="min_scale"):
    optax_lgm.lgm(0.1, min_scale=5.0, max_scale=1.0)


@pytest.mark.parametrize("factory", [optax_lgm.lgm, optax_lgm.dgs])
def test_negative_learning_rate(factory):
  with pytest.raises(ValueError, match="learning_rate=-0.1"):
    factory(-0.1)


def test_select_layers_on_a_fresh_state():
  tx = optax_lgm.layer_sam(optax.sgd(0.1), k=1)
  with pytest.raises(ValueError, match="taken a step"):
    optax_lgm.select_layers(tx.init(PARAMS), k=1)


@pytest.mark.parametrize(
  "selection,match",
  [
    ((), "at least one layer"),
    ((1, 1), "more than once"),
    ((0, "a"), "more than once"),
  ],
)
def test_empty_or_repeated_selection(selection, match):
  tx = optax_lgm.layer_sam(optax.sgd(0.1), k=1)
  with pytest.raises(ValueError, match=match):
    tx.update(
      grad_fn(PARAMS, 0), tx.init(PARAMS), PARAMS, grad_fn=grad_fn, selection=selection
    )


def test_layer_sam_inside_optax_partition_says_use_mask():
  labels = {"a": {"w": "sam", "b": "sam"}, "c": {"w": "sgd"}}
  tx = optax.partition(
    {"sam": optax_lgm.layer_sam(optax.sgd(0.1), k=1), "sgd": optax.sgd(0.1)},
    labels,
  )
  with pytest.raises(ValueError, match=r"mask=") as info:
    tx.update(grad_fn(PARAMS, 0), tx.init(PARAMS), PARAMS, grad_fn=grad_fn)
  assert "optax.partition" in str(info.value)


def test_the_fix_layer_sam_with_mask():
  mask = {"a": {"w": True, "b": True}, "c": {"w": False}}
  tx = optax_lgm.layer_sam(optax.sgd(0.1), k=1, mask=mask)
  updates, _ = tx.update(grad_fn(PARAMS, 0), tx.init(PARAMS), PARAMS, grad_fn=grad_fn)
  assert jax.tree.structure(updates) == jax.tree.structure(PARAMS)


OTHER_TREE = {"a": {"w": jnp.ones((3, 2))}, "d": jnp.ones(5)}


@pytest.mark.parametrize(
  "tx",
  [
    optax_lgm.scale_by_lgm(),
    optax_lgm.scale_by_lgm(variance="temporal"),
    optax_lgm.keep_top_k_layers(1, layers="leaf"),
  ],
  ids=["lgm", "lgm_temporal", "keep_top_k_layers"],
)
def test_gradients_unlike_the_params_of_init(tx):
  with pytest.raises(ValueError, match="given to init") as info:
    tx.update(OTHER_TREE, tx.init(PARAMS))
  # Both are named: the leaf the gradients lack and the one they have extra.
  assert "'d'" in str(info.value) and "'c/w'" in str(info.value)


def test_names_alone_are_still_checked():
  """A state whose LayerNames record no leaves (built by hand) checks the layers."""
  tx = optax_lgm.scale_by_lgm()
  state = tx.init(PARAMS)._replace(names=optax_lgm.LayerNames(("x", "y")))
  with pytest.raises(ValueError, match="initialised on params with the layers"):
    tx.update(PARAMS, state)


EVERY_TRANSFORMATION = {
  "scale_by_lgm": optax_lgm.scale_by_lgm(),
  "lgm": optax_lgm.lgm(0.1),
  "scale_by_dgs": optax_lgm.scale_by_dgs(),
  "dgs": optax_lgm.dgs(3e-4),
  "keep_top_k_layers": optax_lgm.keep_top_k_layers(1),
  "layer_sam": optax_lgm.layer_sam(optax.sgd(0.1), k=1),
}


def test_every_public_transformation_checks_the_gradients():
  factories = {
    name
    for name in optax_lgm.__all__
    if name[0].islower() and name not in ("layer_names", "layer_stats", "select_layers")
  }
  assert factories == set(EVERY_TRANSFORMATION)


def update_jitted(tx, grads):
  """``tx.update`` under ``jax.jit``: the check runs on static shapes."""
  extra = {"grad_fn": grad_fn} if "layer_sam" in repr(tx.update) else {}

  @jax.jit
  def update(grads, state):
    return tx.update(grads, state, PARAMS, **extra)

  return update(grads, tx.init(PARAMS))


@pytest.mark.parametrize("name", sorted(EVERY_TRANSFORMATION))
def test_gradients_of_another_shape(name):
  grads = {"a": {"w": jnp.ones((2, 3)), "b": jnp.ones(2)}, "c": {"w": jnp.ones(4)}}
  with pytest.raises(ValueError) as info:
    update_jitted(EVERY_TRANSFORMATION[name], grads)
  message = str(info.value)
  assert "leaf 'a/w' has shape (2, 3)" in message and "(3, 2)" in message
  assert "\n" not in message


@pytest.mark.parametrize("name", sorted(EVERY_TRANSFORMATION))
def test_gradients_with_a_leaf_missing_or_extra(name):
  lacking = {"a": {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}}
  with pytest.raises(ValueError, match="lack the leaves 'c/w'"):
    update_jitted(EVERY_TRANSFORMATION[name], lacking)
  extra = {**PARAMS, "d": jnp.ones(3)}
  with pytest.raises(ValueError, match="have leaves 'd' that init's params do not"):
    update_jitted(EVERY_TRANSFORMATION[name], extra)


@pytest.mark.parametrize("optimizer", [optax.sgd, 0.05, None])
def test_layer_sam_needs_a_transformation(optimizer):
  with pytest.raises(
    TypeError, match="optimizer must be an optax.GradientTransformation"
  ):
    optax_lgm.layer_sam(optimizer)


def test_layer_sam_of_the_uncalled_factory_names_the_slip():
  with pytest.raises(TypeError, match=r"optax\.sgd\(lr\), not optax\.sgd"):
    optax_lgm.layer_sam(optax.sgd)
  with pytest.raises(TypeError, match=r"optimizer=0\.05.*optax\.sgd\(0\.05"):
    optax_lgm.layer_sam(0.05)


@pytest.mark.parametrize(
  "bad_grad_fn",
  [lambda p: p, lambda: None, lambda p, i, batch: p, "grad_fn"],
  ids=["one_argument", "no_argument", "three_arguments", "not_callable"],
)
def test_grad_fn_of_the_wrong_signature(bad_grad_fn):
  tx = optax_lgm.layer_sam(optax.sgd(0.1), k=1)
  with pytest.raises(TypeError, match=r"grad_fn\(params, i\) -> grads") as info:
    tx.update(PARAMS, tx.init(PARAMS), PARAMS, grad_fn=bad_grad_fn)
  assert "\n" not in str(info.value)


def test_grad_fn_with_defaults_or_varargs_is_accepted():
  tx = optax_lgm.layer_sam(optax.sgd(0.1), k=1)
  for good in (lambda p, i=0: grad_fn(p, i), lambda *args: grad_fn(*args)):
    tx.update(PARAMS, tx.init(PARAMS), PARAMS, grad_fn=good)


def test_traced_selection_names_static_argnames():
  nnx = pytest.importorskip("flax.nnx")
  tx = optax_lgm.layer_sam(optax.sgd(0.1), k=1)
  state = tx.init(PARAMS)

  @nnx.jit  # forgot static_argnames="selection"
  def step(state, selection=None):
    return tx.update(PARAMS, state, PARAMS, grad_fn=grad_fn, selection=selection)

  with pytest.raises(ValueError) as info:
    step(state, selection=(0,))
  message = str(info.value)
  assert "static_argnames='selection'" in message
  assert "nnx.jit(step, static_argnames='selection')" in message
  assert "\n" not in message


def test_dgs_importance_unlike_the_gradients():
  tx = optax_lgm.scale_by_dgs(importance_decay=0.9)
  with pytest.raises(ValueError, match="given to init") as info:
    tx.update(OTHER_TREE, tx.init(PARAMS))
  assert "'d'" in str(info.value) and "'c/w'" in str(info.value)


def test_layer_sam_params_unlike_the_gradients():
  tx = optax_lgm.layer_sam(optax.sgd(0.1), k=1)
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match="params must have the structure") as info:
    tx.update(grad_fn(PARAMS, 0), state, OTHER_TREE, grad_fn=grad_fn)
  assert "'d'" in str(info.value) and "'c'" in str(info.value)


def test_layer_stats_is_json_and_raises_without_statistics():
  tx = optax_lgm.layer_sam(optax_lgm.lgm(0.1), k=1)
  _, state = tx.update(grad_fn(PARAMS, 0), tx.init(PARAMS), PARAMS, grad_fn=grad_fn)
  stats = optax_lgm.layer_stats(state)
  assert json.loads(json.dumps(stats)) == stats
  assert type(stats["sam_selected"]["a"]) is int
  assert type(stats["lgm_scale"]["a/w"]) is float
  with pytest.raises(ValueError, match="no per-layer statistics"):
    optax_lgm.layer_stats(optax.sgd(0.1).init(PARAMS))
  with pytest.raises(ValueError, match="type dict"):
    optax_lgm.layer_stats(PARAMS)
