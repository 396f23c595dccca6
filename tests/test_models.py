"""Tests for examples/models.py."""

import _stacking  # tests/_stacking.py: the two layouts of the transformer.
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from examples import models

# (input_shape, mean, std) of digits, MNIST and CIFAR-10.
SHAPES = {
  "digits": ((8, 8, 1), (0.31,), (0.38,)),
  "mnist": ((28, 28, 1), (0.13,), (0.31,)),
  "cifar10": ((32, 32, 3), (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)),
}


def _create(model_fn, *args, **kwargs):
  """Builds a model in one compilation, with a cheap-to-compile PRNG.

  XLA:CPU compiles RBG random bits several times faster than threefry's, and
  eagerly every new parameter shape would be a new compilation.
  """
  return nnx.jit(
    lambda: model_fn(*args, **kwargs, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  )()


def _images(shape):
  return np.random.default_rng(0).uniform(size=shape).astype(np.float32)


def _num_params(model):
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("dataset", SHAPES)
@pytest.mark.parametrize("name", models.MODELS)
def test_output_shape(name, dataset):
  input_shape, mean, std = SHAPES[dataset]

  def forward(images):
    model = models.create_model(name, 7, input_shape, mean, std, nnx.Rngs(0))
    return model(images)

  images = jax.ShapeDtypeStruct((3, *input_shape), jnp.float32)
  logits = jax.eval_shape(forward, images)
  assert logits.shape == (3, 7)
  assert logits.dtype == jnp.float32


@pytest.mark.parametrize("name", models.MODELS)
def test_bfloat16_computes_in_bfloat16_with_float32_parameters(name):
  input_shape, mean, std = SHAPES["digits"]

  def forward(images):
    model = models.create_model(
      name, 7, input_shape, mean, std, nnx.Rngs(0), dtype=jnp.bfloat16
    )
    return model(images), nnx.state(model)

  images = jax.ShapeDtypeStruct((3, *input_shape), jnp.float32)
  logits, state = jax.eval_shape(forward, images)
  assert logits.dtype == jnp.bfloat16
  assert {x.dtype for x in jax.tree.leaves(state)} == {jnp.dtype(jnp.float32)}


def test_resnet_sizes():
  cifar = SHAPES["cifar10"]
  resnet20 = nnx.eval_shape(lambda: models.resnet20(10, *cifar, rngs=nnx.Rngs(0)))
  resnet32 = nnx.eval_shape(lambda: models.resnet32(10, *cifar, rngs=nnx.Rngs(0)))
  # He et al. (2016), Table 6: 0.27M and 0.46M parameters.
  assert round(_num_params(resnet20) / 1e6, 2) == 0.27
  assert round(_num_params(resnet32) / 1e6, 2) == 0.46
  assert len(resnet20.blocks) == 9 and len(resnet32.blocks) == 15
  projection = nnx.eval_shape(
    lambda: models.resnet20(10, *cifar, shortcut="projection", rngs=nnx.Rngs(0))
  )
  assert _num_params(projection) > _num_params(resnet20)


def test_models_normalise_pixels_inside():
  input_shape, mean, std = SHAPES["digits"]
  model = _create(models.CNN, 10, input_shape, mean, std, features=(4, 8), hidden=16)
  unnormalised = nnx.clone(model)
  unnormalised.mean, unnormalised.std = (0.0,), (1.0,)
  images = _images((2, *input_shape))
  standardised = (images - np.float32(mean[0])) / np.float32(std[0])
  np.testing.assert_allclose(
    model(images), unnormalised(standardised), rtol=1e-5, atol=1e-5
  )


def _batch_stats(model):
  return jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))


def test_batch_norm_train_and_eval_modes():
  input_shape, mean, std = SHAPES["digits"]
  model = _create(models.ResNet, 10, input_shape, mean, std, depth=8, width=4)
  forward = nnx.jit(lambda model, images: model(images))
  images = _images((6, *input_shape))
  initial = _batch_stats(model)

  model.eval()
  eval_logits = forward(model, images)
  jax.tree.map(np.testing.assert_array_equal, _batch_stats(model), initial)
  # Running statistics: an image's logits do not depend on the rest of its batch.
  other_images = np.concatenate([images[:1], 1.0 - images[1:]])
  np.testing.assert_allclose(
    forward(model, other_images)[0], eval_logits[0], rtol=1e-5, atol=1e-5
  )

  model.train()
  train_logits = forward(model, images)
  changed = jax.tree.map(
    lambda a, b: not np.allclose(a, b), _batch_stats(model), initial
  )
  assert all(jax.tree.leaves(changed))
  assert not np.allclose(train_logits, eval_logits)


def test_models_without_batch_norm_ignore_the_mode():
  input_shape, mean, std = SHAPES["digits"]
  model = _create(
    models.TransformerClassifier,
    10,
    input_shape,
    mean,
    std,
    dim=8,
    depth=1,
    num_heads=2,
    mlp_dim=8,
  )
  forward = nnx.jit(lambda model, images: model(images))
  images = _images((2, *input_shape))
  train_logits = forward(model, images)
  model.eval()
  np.testing.assert_allclose(forward(model, images), train_logits, rtol=1e-6)
  assert np.isfinite(train_logits).all()


def _transformer(stacked, depth=3):
  """An abstract (``nnx.eval_shape``) tiny transformer on digits."""
  return nnx.eval_shape(
    lambda: models.create_model(
      "transformer",
      10,
      *SHAPES["digits"],
      nnx.Rngs(0),
      dim=8,
      depth=depth,
      num_heads=2,
      mlp_dim=8,
      stacked=stacked,
    )
  )


def _shapes(tree):
  return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


def test_stacked_transformer_layout():
  unstacked = nnx.state(_transformer(False), nnx.Param)
  stacked = nnx.state(_transformer(True), nnx.Param)
  assert stacked["blocks"]["mlp_in"]["kernel"].shape == (3, 8, 8)
  assert stacked["blocks"]["attention"]["query"]["kernel"].shape == (3, 8, 2, 4)
  assert sorted(unstacked["blocks"]) == [0, 1, 2]
  assert _num_params(_transformer(True)) == _num_params(_transformer(False))
  # The conversions give the other model's tree: structure, shapes and dtypes.
  stack, unstack = _stacking.stack_params, _stacking.unstack_params
  assert _shapes(jax.eval_shape(stack, unstacked)) == _shapes(stacked)
  assert _shapes(jax.eval_shape(unstack, stacked)) == _shapes(unstacked)
  # Plain dicts too (nnx.to_pure_dict).
  pure = nnx.to_pure_dict(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), unstacked))
  pure = _stacking.stack_params(pure)
  assert isinstance(pure, dict) and pure["blocks"]["mlp_out"]["bias"].shape == (3, 8)


def test_layer_axes():
  # One block per layer: the stacked blocks' leading axis; else every leaf.
  assert _transformer(False).layer_axes is None
  model = _transformer(True)
  axes = jax.tree_util.tree_map_with_path(
    lambda path, _: model.layer_axes(path, None),
    nnx.to_pure_dict(nnx.state(model, nnx.Param)),
  )
  assert axes["blocks"]["mlp_in"]["kernel"] == 1
  assert axes["head"]["kernel"] == 0 and axes["position_embedding"] == 0
  # The same function for every stacked model: optimizers built with it hash
  # the same (one compiled step for several seeds).
  assert _transformer(True, 2).layer_axes is model.layer_axes
  assert models.CNN.layer_axes is None and models.ResNet.layer_axes is None


def test_stacked_transformer_computes_the_same_function():
  forward, abstract = {}, {}
  for stacked in (False, True):
    graphdef, abstract[stacked] = nnx.split(_transformer(stacked, 2), nnx.Param)
    forward[stacked] = jax.jit(
      lambda params, images, graphdef=graphdef: nnx.merge(graphdef, params)(images),
      compiler_options={"xla_backend_optimization_level": 0},  # Compiles faster.
    )
  # Random weights, without compiling the initialisers.
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), abstract[False]
  )
  images = _images((3, *SHAPES["digits"][0]))
  np.testing.assert_allclose(
    forward[True](_stacking.stack_params(params), images),
    forward[False](params, images),
    rtol=1e-5,
    atol=1e-6,
  )
  # Round trip, exactly.
  back = _stacking.unstack_params(_stacking.stack_params(params))
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_stack_params_needs_blocks():
  with pytest.raises(ValueError, match="'blocks'"):
    _stacking.stack_params({"head": np.ones(2)})
  with pytest.raises(ValueError, match="indexed 0, 1"):
    _stacking.stack_params({"blocks": {1: {"w": np.ones(2)}}})
  with pytest.raises(ValueError, match="leading axis"):
    _stacking.unstack_params({"blocks": {"a": np.ones(2), "b": np.ones(3)}})


@pytest.mark.parametrize(
  ("build", "match"),
  [
    (
      lambda: models.create_model("mlp", 10, (8, 8, 1), (0.3,), (0.4,), nnx.Rngs(0)),
      "mlp",
    ),
    (
      lambda: models.ResNet(10, (8, 8, 1), (0.3,), (0.4,), depth=21, rngs=nnx.Rngs(0)),
      "depth=21",
    ),
    (
      lambda: models.ResNet(
        10, (8, 8, 1), (0.3,), (0.4,), shortcut="conv", rngs=nnx.Rngs(0)
      ),
      "shortcut='conv'",
    ),
    (
      lambda: models.TransformerClassifier(
        10, (8, 8, 1), (0.3,), (0.4,), patch_size=3, rngs=nnx.Rngs(0)
      ),
      "patch_size=3",
    ),
    (
      lambda: models.TransformerClassifier(
        10, (8, 8, 1), (0.3,), (0.4,), depth=0, stacked=True, rngs=nnx.Rngs(0)
      ),
      "depth=0",
    ),
    (
      lambda: models.CNN(10, (32, 32, 3), (0.3,), (0.4,), rngs=nnx.Rngs(0)),
      "one entry per channel",
    ),
    (
      lambda: models.CNN(10, (2, 2, 1), (0.3,), (0.4,), rngs=nnx.Rngs(0)),
      "at least 4x4",
    ),
  ],
)
def test_invalid_arguments(build, match):
  with pytest.raises(ValueError, match=match):
    nnx.eval_shape(build)
