"""Stacked (scanned) layers: ``layer_axes`` makes every stacked block a layer.

The stacked `TransformerClassifier` of ``examples/models.py`` (``nnx.vmap`` /
a scan: one leaf per parameter, with a leading axis of size ``depth``)
and the unstacked one (a list of blocks) compute the same function of the same
weights. With ``layer_axes=model.layer_axes``, every transformation must then
treat the stacked model exactly as the unstacked one, layer for layer: the
same per-layer statistics (matched by name: ``blocks/mlp_in[1]`` is
``blocks/1/mlp_in``), the same selections and, restacked, the same updates,
step after step.
"""

import functools
import re
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _stacking import stack_params  # tests/_stacking.py
from flax import nnx

import optax_lgm
from examples import models

DEPTH = 2
INPUT_SHAPE, MEAN, STD = (8, 8, 1), (0.3,), (0.4,)
STEPS = 3
TOL = {"rtol": 1e-4, "atol": 1e-6}

# LLVM at -O0: these tiny programs run in microseconds either way, and compile
# several times faster (the whole file is dominated by compilation).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


class Layout(NamedTuple):
  """One layout of the model: its parameters and compiled gradient."""

  model: Any  # Abstract (nnx.eval_shape); gives `layer_axes`.
  params: Any  # nnx.State of the parameters.
  grad: Any  # (params, images, labels) -> gradients, compiled ahead of time.


def _layout(stacked: bool, batch, params=None) -> Layout:
  model = nnx.eval_shape(
    lambda: models.TransformerClassifier(
      5,
      INPUT_SHAPE,
      MEAN,
      STD,
      dim=16,
      depth=DEPTH,
      num_heads=2,
      mlp_dim=32,
      stacked=stacked,
      rngs=nnx.Rngs(0),
    )
  )
  graphdef, abstract = nnx.split(model, nnx.Param)
  if params is None:  # Random weights without compiling the initialisers.
    rng = np.random.default_rng(0)
    params = jax.tree.map(
      lambda x: jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype), abstract
    )
  assert jax.tree.structure(params) == jax.tree.structure(abstract)

  def loss(params, images, labels):
    logits = nnx.merge(graphdef, params)(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  # Ahead of time: the compiled executable is also called from layer_sam's
  # jitted update (a callback), where a jitted function would compile again.
  grad = jit(jax.grad(loss)).lower(params, *batch).compile()
  return Layout(model, params, grad)


@pytest.fixture(scope="module")
def layouts():
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.uniform(size=(8, *INPUT_SHAPE)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 5, size=8))
  batch = (images, labels)
  unstacked = _layout(False, batch)
  stacked = _layout(True, batch, stack_params(unstacked.params))
  return unstacked, stacked, batch


def _unstacked_name(name: str) -> str:
  """``blocks/mlp_in[1]`` (stacked) -> ``blocks/1/mlp_in`` (unstacked)."""
  match = re.fullmatch(r"blocks(/.+)?\[(\d+)\]", name)
  return f"blocks/{match[2]}{match[1] or ''}" if match else name


def _path_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _no_key_bias(params):
  """A mask without the attention key biases.

  Softmax is invariant to them, so their gradient is rounding noise (~1e-10
  here), equal in the two layouts only as long as both programs happen to
  round alike. Alone as a layer (``"leaf"``), it would make LGM's statistic of
  that layer, and through the normalisation every layer's, a function of it.
  """
  return jax.tree_util.tree_map_with_path(
    lambda path, _: "attention/key/bias" not in _path_name(path), params
  )


def _per_block(path, leaf):
  """A ``layers`` callable: every block is one layer, in both layouts.

  ``blocks/0/mlp_in/kernel`` is labelled ``blocks/0``; the stacked
  ``blocks/mlp_in/kernel`` is labelled ``blocks``, and ``layer_axes`` splits
  it into ``blocks[0]``, ``blocks[1]``, ... Other leaves are layers of their
  own.
  """
  del leaf
  parts = _path_name(path).split("/")
  if parts[0] != "blocks":
    return "/".join(parts)
  return "/".join(parts[:2]) if parts[1].isdigit() else "blocks"


def _lgm(variance, layers, mask=None):
  return lambda layer_axes: optax_lgm.lgm(
    0.1, variance=variance, layers=layers, layer_axes=layer_axes, mask=mask
  )


def _dgs(layers, mask=None):
  return lambda layer_axes: optax_lgm.dgs(
    0.5,
    reduction="layer",
    importance_decay=0.9,
    momentum=0.9,
    layers=layers,
    layer_axes=layer_axes,
    mask=mask,
  )


def _sam(layers):
  return lambda layer_axes: optax_lgm.layer_sam(
    optax.sgd(0.1), rho=0.05, k=4, layers=layers, layer_axes=layer_axes
  )


CASES = {
  "lgm_spatial_module": _lgm("spatial", "module"),
  "lgm_temporal_leaf": _lgm("temporal", "leaf", _no_key_bias),
  "dgs_layer_per_block": _dgs(_per_block),
  "layer_sam_module": _sam("module"),
}


apply_updates = jit(optax.apply_updates)


def _run(layout, tx, batch, selection=None):
  """``STEPS`` steps of ``tx``; returns the updates and state of each step."""
  images, labels = batch
  params, state = layout.params, tx.init(layout.params)
  if isinstance(state, optax_lgm.LayerSamState):

    def grad_fn(params, _):
      # The layout's compiled gradient, called back from the jitted update:
      # the model is compiled once per layout, not into every update.
      shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
      return jax.pure_callback(lambda p: layout.grad(p, images, labels), shapes, params)

    update = jit(
      lambda g, state, params: tx.update(
        g, state, params, grad_fn=grad_fn, selection=selection
      )
    )
  else:
    update = jit(tx.update)
  history = []
  for _ in range(STEPS):
    updates, state = update(layout.grad(params, images, labels), state, params)
    params = apply_updates(params, updates)
    history.append((updates, state))
  return history


def _assert_same_layer_stats(state_stacked, state_unstacked):
  """Per-layer statistics agree, layer for layer, under the name mapping."""
  stacked = optax_lgm.layer_stats(state_stacked)
  unstacked = optax_lgm.layer_stats(state_unstacked)
  assert stacked and stacked.keys() == unstacked.keys()
  for key, values in unstacked.items():
    renamed = {_unstacked_name(n): v for n, v in stacked[key].items()}
    assert sorted(renamed) == sorted(values), key
    names = sorted(values)
    np.testing.assert_allclose(
      [renamed[n] for n in names], [values[n] for n in names], err_msg=key, **TOL
    )


def _layer_names(layout, layers):
  return optax_lgm.layer_names(
    layout.params, layers, layer_axes=layout.model.layer_axes
  )


def test_layer_axes_names_every_block(layouts):
  unstacked, stacked, _ = layouts
  for layers in ("leaf", "module"):
    names_s = _layer_names(stacked, layers)
    names_u = _layer_names(unstacked, layers)
    assert len(names_s) == len(set(names_s))
    assert sorted(map(_unstacked_name, names_s)) == sorted(names_u)
  assert f"blocks/mlp_in[{DEPTH - 1}]" in _layer_names(stacked, "module")
  per_block = _layer_names(stacked, _per_block)
  assert sorted(map(_unstacked_name, per_block)) == sorted(
    _layer_names(unstacked, _per_block)
  )
  assert per_block[:DEPTH] == tuple(f"blocks[{i}]" for i in range(DEPTH))
  # The unstacked model needs no layer_axes: its method gives 0 everywhere.
  assert _layer_names(unstacked, "module") == optax_lgm.layer_names(
    unstacked.params, "module"
  )
  # Without layer_axes, a stacked leaf is one layer for all the blocks.
  assert "blocks/mlp_in" in optax_lgm.layer_names(stacked.params, "module")


def test_gradients_agree(layouts):
  unstacked, stacked, (images, labels) = layouts
  grads_u = unstacked.grad(unstacked.params, images, labels)
  grads_s = stacked.grad(stacked.params, images, labels)
  chex.assert_trees_all_close(stack_params(grads_u), grads_s, **TOL)


@pytest.mark.parametrize("case", CASES)
def test_stacked_equals_unstacked(layouts, case):
  unstacked, stacked, batch = layouts
  make = CASES[case]
  history_u = _run(unstacked, make(unstacked.model.layer_axes), batch)
  history_s = _run(stacked, make(stacked.model.layer_axes), batch)
  for (updates_u, state_u), (updates_s, state_s) in zip(history_u, history_s):
    chex.assert_trees_all_close(updates_s, stack_params(updates_u), **TOL)
    if case.startswith("dgs"):  # No per-layer state: compare the importance.
      importance_u, importance_s = state_u[0].importance, state_s[0].importance
      chex.assert_trees_all_close(
        importance_s, stack_params(importance_u), **TOL
      )
    else:
      _assert_same_layer_stats(state_s, state_u)
    if case == "lgm_temporal_leaf":  # The per-element EMA of the gradient.
      chex.assert_trees_all_close(
        state_s[0].mu, stack_params(state_u[0].mu), **TOL
      )
  if case.startswith("layer_sam"):
    # The dynamic selection picked single blocks of a stacked leaf, not the
    # whole stack: the test exercises per-block selection.
    selected = optax_lgm.layer_stats(state_s)["sam_selected_count"]
    blocks = {n for n, count in selected.items() if count and n.startswith("blocks")}
    assert blocks
    stacks = {n.rsplit("[", 1)[0] for n in blocks}
    assert any(
      sum(n.startswith(stack + "[") for n in blocks) < DEPTH for stack in stacks
    )


def test_layer_sam_static_selection_by_name(layouts):
  """A static selection names single blocks; equal to the unstacked model's."""
  unstacked, stacked, batch = layouts
  selection_s = ("blocks/mlp_in[1]", "blocks/attention/value[0]", "head")
  selection_u = tuple(map(_unstacked_name, selection_s))
  tx_u = _sam("module")(unstacked.model.layer_axes)
  tx_s = _sam("module")(stacked.model.layer_axes)
  history_u = _run(unstacked, tx_u, batch, selection_u)
  history_s = _run(stacked, tx_s, batch, selection_s)
  for (updates_u, state_u), (updates_s, state_s) in zip(history_u, history_s):
    chex.assert_trees_all_close(updates_s, stack_params(updates_u), **TOL)
    _assert_same_layer_stats(state_s, state_u)
  selected = optax_lgm.layer_stats(state_s)["sam_selected_count"]
  assert {n for n, count in selected.items() if count} == set(selection_s)


def test_without_layer_axes_the_updates_differ(layouts):
  """The control: a stack taken as one layer gives other updates.

  DGS's layer reduction is local to each layer, so it runs on the blocks
  alone (a small tree, quick to compile); ``layer_axes=1`` there is the
  stacked model's ``layer_axes`` restricted to its blocks.
  """
  unstacked, stacked, (images, labels) = layouts
  grads_u = unstacked.grad(unstacked.params, images, labels)["blocks"]
  grads_s = stacked.grad(stacked.params, images, labels)["blocks"]

  def dgs(grads, layer_axes):
    tx = optax_lgm.scale_by_dgs(
      reduction="layer", layers="module", layer_axes=layer_axes
    )
    return jit(tx.update)(grads, tx.init(grads))[0]

  expected = stack_params({"blocks": dgs(grads_u, None)})["blocks"]
  chex.assert_trees_all_close(dgs(grads_s, 1), expected, **TOL)
  together = dgs(grads_s, None)
  assert not np.allclose(
    together["mlp_in"]["kernel"][...], expected["mlp_in"]["kernel"][...], **TOL
  )
