"""Flax NNX image classifiers for the examples.

Every model takes ``(num_classes, input_shape, mean, std, *, ..., dtype, rngs)``
(``input_shape`` ``(H, W, C)``, ``mean`` and ``std`` of the [0, 1] pixels from
`examples.input_pipeline`, ``dtype`` of the computation; parameters stay
float32) and maps pixels ``[B, H, W, C]`` to logits, standardising inside
``__call__``. ``model.layer_axes`` is the ``layer_axes`` of ``optax_lgm`` and
``model.output_layers`` the two layers nearest the output, as ``layer_sam``
names them. Models start in training mode (``model.eval()``: BatchNorm's
running statistics).
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Shape = Sequence[int]
Stats = Sequence[float]


class _Classifier(nnx.Module):
  """Checks the image shape and statistics; standardises the pixels."""

  layer_axes = None  # Every leaf is one layer.

  def __init__(self, input_shape: Shape, mean: Stats, std: Stats):
    if len(input_shape) != 3:
      raise ValueError(
        f"input_shape must be (height, width, channels), got {input_shape}."
      )
    if len(mean) != input_shape[-1] or len(std) != input_shape[-1]:
      raise ValueError(
        f"mean={tuple(mean)} and std={tuple(std)} must have one entry per "
        f"channel of input_shape={tuple(input_shape)}."
      )
    self.mean, self.std = tuple(mean), tuple(std)

  def _standardize(self, images: jax.Array) -> jax.Array:
    mean = jnp.asarray(self.mean, images.dtype)
    return (images - mean) / jnp.asarray(self.std, images.dtype)


class CNN(_Classifier):
  """A small convolutional network, after Flax's ``examples/mnist``.

  Two 3x3 convolutions of ``features`` channels, each followed by a ReLU and
  2x2 average pooling, a dense layer of width ``hidden`` and the output layer.
  """

  output_layers = ("dense", "head")

  def __init__(
    self, num_classes: int, input_shape: Shape, mean: Stats, std: Stats, *,
    features: tuple[int, int] = (32, 64), hidden: int = 256,
    dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs,
  ):  # fmt: skip
    super().__init__(input_shape, mean, std)
    height, width, channels = input_shape[0] // 4, input_shape[1] // 4, input_shape[2]
    if height < 1 or width < 1:
      raise ValueError(
        f"CNN needs images of at least 4x4 pixels, got input_shape={input_shape}."
      )
    kwargs = dict(dtype=dtype, rngs=rngs)
    self.conv1 = nnx.Conv(channels, features[0], (3, 3), **kwargs)
    self.conv2 = nnx.Conv(features[0], features[1], (3, 3), **kwargs)
    self.dense = nnx.Linear(height * width * features[1], hidden, **kwargs)
    self.head = nnx.Linear(hidden, num_classes, **kwargs)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Returns the logits ``[B, num_classes]`` of images ``[B, H, W, C]``."""
    x = self._standardize(images)
    x = nnx.avg_pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))
    x = nnx.avg_pool(nnx.relu(self.conv2(x)), (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    return self.head(nnx.relu(self.dense(x)))


def _conv_bn(in_features, out_features, kernel, strides, **kwargs):
  """A bias-free He-initialised convolution and the BatchNorm after it."""
  conv = nnx.Conv(
    in_features, out_features, (kernel, kernel), strides, use_bias=False,
    kernel_init=nnx.initializers.he_normal(), **kwargs,
  )  # fmt: skip
  return conv, nnx.BatchNorm(out_features, momentum=0.9, epsilon=1e-5, **kwargs)


class BasicBlock(nnx.Module):
  """A residual block of two 3x3 convolutions (He et al., 2016).

  Where the shape changes, the ``shortcut`` is ``"padding"`` (option A: zeros)
  or ``"projection"`` (option B: a strided 1x1 convolution and BatchNorm).
  """

  def __init__(
    self, in_features: int, out_features: int, strides: int, shortcut: str, *,
    dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs,
  ):  # fmt: skip
    kwargs = dict(dtype=dtype, rngs=rngs)
    self.strides = strides
    self.conv1, self.bn1 = _conv_bn(in_features, out_features, 3, strides, **kwargs)
    self.conv2, self.bn2 = _conv_bn(out_features, out_features, 3, 1, **kwargs)
    self.pad_features = out_features - in_features if shortcut == "padding" else 0
    self.projection = (
      nnx.Sequential(*_conv_bn(in_features, out_features, 1, strides, **kwargs))
      if shortcut == "projection" and (strides != 1 or in_features != out_features)
      else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the block to feature maps ``[B, H, W, C]``."""
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.projection is not None:
      x = self.projection(x)
    else:
      x = x[:, :: self.strides, :: self.strides, :]
      x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, self.pad_features)))
    return nnx.relu(y + x)


class ResNet(_Classifier):
  """The CIFAR ResNet of He et al. (2016), Section 4.2.

  A 3x3 convolution with ``width`` channels, three stages of ``(depth - 2) / 6``
  `BasicBlock` s with ``width``, ``2 * width`` and ``4 * width`` channels (the
  last two starting with stride 2), global average pooling and the output layer.

  References:
    He et al., `Deep Residual Learning for Image Recognition
    <https://arxiv.org/abs/1512.03385>`_, 2016.
  """

  def __init__(
    self, num_classes: int, input_shape: Shape, mean: Stats, std: Stats, *,
    depth: int = 20, width: int = 16, shortcut: str = "padding",
    dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs,
  ):  # fmt: skip
    super().__init__(input_shape, mean, std)
    if depth < 8 or (depth - 2) % 6:
      raise ValueError(f"depth must be 6 * n + 2 with n >= 1, got depth={depth}.")
    if shortcut not in ("padding", "projection"):
      raise ValueError(
        f"shortcut must be 'padding' or 'projection', got shortcut={shortcut!r}."
      )
    kwargs = dict(dtype=dtype, rngs=rngs)
    self.conv, self.bn = _conv_bn(input_shape[-1], width, 3, 1, **kwargs)
    features = [width * 2**stage for stage in range(3) for _ in range((depth - 2) // 6)]
    self.blocks = nnx.List(
      BasicBlock(i, o, 1 if i == o else 2, shortcut, **kwargs)  # Stride 2: wider.
      for i, o in zip([width, *features], features)
    )
    self.head = nnx.Linear(features[-1], num_classes, **kwargs)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Returns the logits ``[B, num_classes]`` of images ``[B, H, W, C]``."""
    x = nnx.relu(self.bn(self.conv(self._standardize(images))))
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean(axis=(1, 2)))

  @property
  def output_layers(self) -> tuple[str, ...]:
    """The two layers nearest the output, as ``layer_sam`` names them."""
    return (f"blocks/{len(self.blocks) - 1}/bn2", "head")


resnet20 = functools.partial(ResNet, depth=20)
resnet32 = functools.partial(ResNet, depth=32)


class EncoderBlock(nnx.Module):
  """A pre-LayerNorm transformer encoder block with a GELU MLP."""

  def __init__(
    self, dim: int, num_heads: int, mlp_dim: int, *,
    dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs,
  ):  # fmt: skip
    kwargs = dict(dtype=dtype, rngs=rngs)
    self.attention_norm = nnx.LayerNorm(dim, **kwargs)
    self.attention = nnx.MultiHeadAttention(
      num_heads=num_heads, in_features=dim, decode=False, **kwargs
    )
    self.mlp_norm = nnx.LayerNorm(dim, **kwargs)
    self.mlp_in = nnx.Linear(dim, mlp_dim, **kwargs)
    self.mlp_out = nnx.Linear(mlp_dim, dim, **kwargs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""
    x = x + self.attention(self.attention_norm(x))
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.mlp_norm(x))))


class TransformerClassifier(_Classifier):
  """A small vision transformer with mean pooling.

  ``patch_size`` patches (``None``: 2 on images of at most 16 pixels a side,
  else 4) embedded by a strided convolution plus a learned position embedding,
  ``depth`` `EncoderBlock` s, a LayerNorm, the mean over tokens and the output
  layer. With ``stacked=True`` the blocks are one `EncoderBlock` (``nnx.vmap``,
  applied with ``jax.lax.scan``) whose parameters have a leading axis of size
  ``depth``: the same function of the same weights.

  References:
    Dosovitskiy et al., `An Image is Worth 16x16 Words
    <https://arxiv.org/abs/2010.11929>`_, 2021.
  """

  output_layers = ("norm", "head")

  def __init__(
    self, num_classes: int, input_shape: Shape, mean: Stats, std: Stats, *,
    patch_size: int | None = None, dim: int = 64, depth: int = 2,
    num_heads: int = 4, mlp_dim: int = 128, stacked: bool = False,
    dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs,
  ):  # fmt: skip
    super().__init__(input_shape, mean, std)
    height, width, channels = input_shape
    if patch_size is None:
      patch_size = 2 if max(height, width) <= 16 else 4
    if height % patch_size or width % patch_size:
      raise ValueError(
        f"patch_size={patch_size} must divide the height and width of "
        f"input_shape={tuple(input_shape)}."
      )
    if stacked and depth < 1:
      raise ValueError(f"stacked=True needs depth >= 1, got depth={depth}.")
    patch = (patch_size, patch_size)
    self.patch_embedding = nnx.Conv(
      channels, dim, patch, patch_size, padding="VALID", dtype=dtype, rngs=rngs
    )
    num_patches = (height // patch_size) * (width // patch_size)
    self.position_embedding = nnx.Param(
      nnx.initializers.normal(0.02)(rngs.params(), (1, num_patches, dim))
    )
    self.stacked = stacked
    # Stacked: one layer per block, one function for all (optimizers hash alike).
    self.layer_axes = _stacked_layer_axes if stacked else None

    def block(rngs: nnx.Rngs) -> EncoderBlock:
      return EncoderBlock(dim, num_heads, mlp_dim, dtype=dtype, rngs=rngs)

    if stacked:
      vmapped = nnx.vmap(block, in_axes=(0,), out_axes=0)
      self.blocks = nnx.split_rngs(splits=depth)(vmapped)(rngs)
    else:
      self.blocks = nnx.List([block(rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Returns the logits ``[B, num_classes]`` of images ``[B, H, W, C]``."""
    x = self.patch_embedding(self._standardize(images))
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    x = x + self.position_embedding[...].astype(x.dtype)
    if self.stacked:
      # A scan over the blocks' stacked state (nnx's functional API): unlike
      # `nnx.scan`, it also runs where the model was merged from the state of
      # an outer trace, e.g. inside `jax.grad` with respect to the images.
      graphdef, blocks = nnx.split(self.blocks)

      def apply_block(x: jax.Array, block: nnx.State) -> tuple[jax.Array, None]:
        return nnx.merge(graphdef, block)(x), None

      x, _ = jax.lax.scan(apply_block, x, blocks)
    else:
      for block in self.blocks:
        x = block(x)
    return self.head(self.norm(x).mean(axis=1))


def _stacked_layer_axes(path: tuple, leaf: Any) -> int:
  """1 for the leaves under ``blocks`` of a stacked model, 0 for the others."""
  del leaf
  return int(bool(path) and getattr(path[0], "key", None) == "blocks")


_CONSTRUCTORS: dict[str, Callable[..., nnx.Module]] = {
  "cnn": CNN,
  "resnet20": resnet20,
  "resnet32": resnet32,
  "transformer": TransformerClassifier,
  "transformer_stacked": functools.partial(TransformerClassifier, stacked=True),
}

MODELS = tuple(_CONSTRUCTORS)
"""Names accepted by `create_model`."""


def create_model(
  name: str, num_classes: int, input_shape: Shape, mean: Stats, std: Stats,
  rngs: nnx.Rngs, **kwargs: Any,
) -> nnx.Module:  # fmt: skip
  """Builds a model of `MODELS` by name, in training mode (``kwargs``: options).

  Examples:
    >>> model = create_model("cnn", 10, (8, 8, 1), (0.3,), (0.4,), nnx.Rngs(0))
    >>> model(jnp.zeros((2, 8, 8, 1))).shape
    (2, 10)
  """
  if name not in MODELS:
    raise ValueError(f"Unknown model name={name!r}; expected one of {MODELS}.")
  return _CONSTRUCTORS[name](num_classes, input_shape, mean, std, rngs=rngs, **kwargs)
