"""Flax NNX image classifiers for the examples.

Every model maps images ``float32 [B, H, W, C]`` on the [0, 1] pixel scale to
logits ``[B, num_classes]``, standardising them inside ``__call__`` (so that
the attacks and noise of ``examples.robustness`` act on pixels).

Every model has ``model.layer_axes``, the ``layer_axes`` argument of the
transformations of ``optax_lgm`` for its parameters (``None`` except for the
stacked transformer), and ``model.output_layers``, the two layers nearest the
output as ``layer_sam`` names them (the start selection of
`optax_lgm.StaticSelection` in `examples.train`).

The models take ``(num_classes, input_shape, mean, std, *, ..., dtype, rngs)``:
the number of outputs, ``(height, width, channels)`` of one image, the
per-channel mean and standard deviation of the [0, 1] pixels (from
``examples.input_pipeline.DatasetMetadata``), the computation dtype (the
parameters stay float32) and the random number generators of the
initialisation. They are created in training mode; ``model.eval()`` switches
BatchNorm (only in `ResNet`) to its running statistics, ``model.train()`` back.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

MODELS = ("cnn", "resnet20", "resnet32", "transformer", "transformer_stacked")
"""Names accepted by `create_model` (``"transformer_stacked"``: ``stacked=True``)."""


class _Classifier(nnx.Module):
  """Checks the image shape and statistics; standardises the pixels."""

  layer_axes = None
  """The ``layer_axes`` of ``optax_lgm``: every leaf is one layer."""

  def __init__(
    self, input_shape: Sequence[int], mean: Sequence[float], std: Sequence[float]
  ):
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
    """Maps pixels on [0, 1] to zero mean and unit variance per channel."""
    mean = jnp.asarray(self.mean, images.dtype)
    return (images - mean) / jnp.asarray(self.std, images.dtype)


class CNN(_Classifier):
  """A small convolutional network, after Flax's ``examples/mnist``.

  Two 3x3 convolutions, each followed by a ReLU and 2x2 average pooling, then
  a hidden dense layer and the output layer; images of at least 4x4 pixels.

  Args (beside those of every model):
    features: output channels of the two convolutions.
    hidden: width of the hidden dense layer.
  """

  output_layers = ("dense", "head")

  def __init__(
    self,
    num_classes: int,
    input_shape: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    features: tuple[int, int] = (32, 64),
    hidden: int = 256,
    dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
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


def _conv_bn(
  in_features: int, out_features: int, kernel: int, strides: int, *, dtype, rngs
) -> tuple[nnx.Conv, nnx.BatchNorm]:
  """A bias-free He-initialised convolution and the BatchNorm after it."""
  conv = nnx.Conv(
    in_features,
    out_features,
    (kernel, kernel),
    strides,
    use_bias=False,
    kernel_init=nnx.initializers.he_normal(),
    dtype=dtype,
    rngs=rngs,
  )
  norm = nnx.BatchNorm(out_features, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)
  return conv, norm


class BasicBlock(nnx.Module):
  """A residual block of two 3x3 convolutions (He et al., 2016).

  Args (beside ``dtype`` and ``rngs``, as for every model):
    in_features: input channels.
    out_features: output channels.
    strides: stride of the first convolution and of the shortcut.
    shortcut: where the shape changes, ``"padding"`` (option A of He et al.:
      the identity, subsampled and zero-padded; no parameters) or
      ``"projection"`` (option B: a strided 1x1 convolution and BatchNorm).
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    strides: int,
    shortcut: str,
    *,
    dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    kwargs = dict(dtype=dtype, rngs=rngs)
    self.strides = strides
    self.conv1, self.bn1 = _conv_bn(in_features, out_features, 3, strides, **kwargs)
    self.conv2, self.bn2 = _conv_bn(out_features, out_features, 3, 1, **kwargs)
    reshapes = strides != 1 or in_features != out_features
    self.pad_features = out_features - in_features if shortcut == "padding" else 0
    self.projection = (
      nnx.Sequential(*_conv_bn(in_features, out_features, 1, strides, **kwargs))
      if reshapes and shortcut == "projection"
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

  A 3x3 convolution with ``width`` channels, then three stages of
  ``(depth - 2) / 6`` blocks (`BasicBlock`) with ``width``, ``2 * width`` and
  ``4 * width`` channels (the second and third start with stride 2), global
  average pooling and the output layer.

  Args (beside those of every model):
    depth: number of layers with weights, ``6 * n + 2`` (20, 32, 44, 56, ...).
    width: channels of the first stage.
    shortcut: ``"padding"`` (the paper's CIFAR choice) or ``"projection"``;
      see `BasicBlock`.

  References:
    He et al., `Deep Residual Learning for Image Recognition
    <https://arxiv.org/abs/1512.03385>`_, 2016.
  """

  def __init__(
    self,
    num_classes: int,
    input_shape: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    depth: int = 20,
    width: int = 16,
    shortcut: str = "padding",
    dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    super().__init__(input_shape, mean, std)
    if depth < 8 or (depth - 2) % 6:
      raise ValueError(f"depth must be 6 * n + 2 with n >= 1, got depth={depth}.")
    if shortcut not in ("padding", "projection"):
      raise ValueError(
        f"shortcut must be 'padding' or 'projection', got shortcut={shortcut!r}."
      )
    kwargs = dict(dtype=dtype, rngs=rngs)
    self.conv, self.bn = _conv_bn(input_shape[-1], width, 3, 1, **kwargs)
    blocks = []
    in_features = width
    for stage in range(3):
      out_features = width * 2**stage
      for i in range((depth - 2) // 6):
        strides = 2 if stage > 0 and i == 0 else 1
        blocks.append(
          BasicBlock(in_features, out_features, strides, shortcut, **kwargs)
        )
        in_features = out_features
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(in_features, num_classes, **kwargs)

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


def resnet20(*args: Any, **kwargs: Any) -> ResNet:
  """Returns a ResNet-20: `ResNet` with ``depth=20`` and the same arguments."""
  return ResNet(*args, depth=20, **kwargs)


def resnet32(*args: Any, **kwargs: Any) -> ResNet:
  """Returns a ResNet-32: `ResNet` with ``depth=32`` and the same arguments."""
  return ResNet(*args, depth=32, **kwargs)


class EncoderBlock(nnx.Module):
  """A pre-LayerNorm transformer encoder block with a GELU MLP.

  Args (beside ``dtype`` and ``rngs``, as for every model):
    dim: width of the token embeddings.
    num_heads: number of attention heads.
    mlp_dim: hidden width of the MLP.
  """

  def __init__(
    self,
    dim: int,
    num_heads: int,
    mlp_dim: int,
    *,
    dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.attention_norm = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
      num_heads=num_heads, in_features=dim, decode=False, dtype=dtype, rngs=rngs
    )
    self.mlp_norm = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.mlp_in = nnx.Linear(dim, mlp_dim, dtype=dtype, rngs=rngs)
    self.mlp_out = nnx.Linear(mlp_dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""
    x = x + self.attention(self.attention_norm(x))
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.mlp_norm(x))))


class TransformerClassifier(_Classifier):
  """A small vision transformer with mean pooling.

  Non-overlapping ``patch_size`` patches embedded by a strided convolution,
  plus a learned position embedding; ``depth`` encoder blocks
  (`EncoderBlock`); a LayerNorm, the mean over tokens and the output layer.

  With ``stacked=True``, ``blocks`` is one `EncoderBlock` (``nnx.vmap``, applied
  with ``jax.lax.scan``) whose parameters have a leading axis of size ``depth``,
  the same function of the same weights as the list of blocks; pass
  ``layer_axes=model.layer_axes`` to ``optax_lgm`` to keep one layer per block.

  Args (beside those of every model):
    patch_size: side of the square patches, dividing the image's height and
      width; ``None`` for 2 on images of at most 16 pixels a side, else 4.
    dim: width of the token embeddings.
    depth: number of encoder blocks.
    num_heads: number of attention heads.
    mlp_dim: hidden width of the MLPs.
    stacked: whether to stack the blocks along a leading axis.

  References:
    Dosovitskiy et al., `An Image is Worth 16x16 Words
    <https://arxiv.org/abs/2010.11929>`_, 2021.
  """

  output_layers = ("norm", "head")

  def __init__(
    self,
    num_classes: int,
    input_shape: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    patch_size: int | None = None,
    dim: int = 64,
    depth: int = 2,
    num_heads: int = 4,
    mlp_dim: int = 128,
    stacked: bool = False,
    dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
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

  @property
  def layer_axes(self) -> Callable[[tuple, Any], int] | None:
    """The ``layer_axes`` of ``optax_lgm`` for ``nnx.state(model, nnx.Param)``.

    For a stacked model, ``(path, leaf) -> 1`` for the leaves under ``blocks``
    (one layer per block) and 0 otherwise, the same function for every stacked
    model (so optimizers built with it hash the same); ``None`` unstacked.
    """
    return _stacked_layer_axes if self.stacked else None


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


def create_model(
  name: str,
  num_classes: int,
  input_shape: Sequence[int],
  mean: Sequence[float],
  std: Sequence[float],
  rngs: nnx.Rngs,
  **kwargs: Any,
) -> nnx.Module:
  """Builds a model by name, in training mode.

  ``name`` is one of `MODELS`; the other arguments are those of every model
  (see the module's docstring), ``kwargs`` those of its constructor.

  Examples:
    >>> from flax import nnx
    >>> model = create_model("cnn", 10, (8, 8, 1), (0.3,), (0.4,), nnx.Rngs(0))
    >>> model(jnp.zeros((2, 8, 8, 1))).shape
    (2, 10)
  """
  if name not in MODELS:
    raise ValueError(f"Unknown model name={name!r}; expected one of {MODELS}.")
  return _CONSTRUCTORS[name](num_classes, input_shape, mean, std, rngs=rngs, **kwargs)
