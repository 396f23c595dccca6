"""Flax NNX image classifiers for the examples.

Public API::

  create_model(name, num_classes, input_shape, mean, std, rngs, **kwargs)
      name in MODELS = ("cnn", "resnet20", "resnet32", "transformer",
                        "transformer_stacked")
  CNN(num_classes, input_shape, mean, std, *, features=(32, 64), hidden=256,
      dtype=float32, rngs)
  ResNet(num_classes, input_shape, mean, std, *, depth=20, width=16,
         shortcut="padding", dtype=float32, rngs)
  resnet20(...), resnet32(...)   ResNet with depth 20 / 32
  TransformerClassifier(num_classes, input_shape, mean, std, *,
                        patch_size=None, dim=64, depth=2, num_heads=4,
                        mlp_dim=128, stacked=False, dtype=float32, rngs)

Every model has ``model.layer_axes``: the ``layer_axes`` argument of the
transformations of ``optax_lgm`` for its parameters (``None`` except for the
stacked transformer, whose blocks share a leading axis).

Mixed precision: ``dtype=jnp.bfloat16`` computes in bfloat16 while the
parameters stay float32 (Flax's ``dtype`` and ``param_dtype``), so gradients
and optimizer states are float32.

Every model maps images ``float32 [B, H, W, C]`` on the [0, 1] pixel scale to
logits ``[B, num_classes]``, and standardises them inside ``__call__`` with the
per-channel ``mean`` and ``std`` given at construction (from
``examples.input_pipeline.DatasetMetadata``). Attacks and noise in
``examples.robustness`` therefore act on pixels.

Train and eval mode: models are created in training mode. ``model.eval()``
switches every BatchNorm to its running statistics
(``use_running_average=True``; attention dropout, when used, off);
``model.train()`` switches back, so that BatchNorm normalises with the batch
statistics and updates its running averages on every call. Only
`ResNet` has BatchNorm; the mode does not change the other two models.

The defaults are small. On 2 CPU cores, once compiled, an epoch of ``digits``
(1,437 8x8 images, batch 64) takes about 0.3 s with the CNN, 0.8 s with the
transformer, 2 s with ResNet-20 and 3.5 s with ResNet-32.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

MODELS = ("cnn", "resnet20", "resnet32", "transformer", "transformer_stacked")
"""Names accepted by `create_model`.

``"transformer_stacked"`` is `TransformerClassifier` with ``stacked=True``;
its optimizers need ``layer_axes=model.layer_axes``.
"""


def _check_name(name: str) -> None:
  if name not in MODELS:
    raise ValueError(f"Unknown model name={name!r}; expected one of {MODELS}.")


def _check_input(
  input_shape: Sequence[int], mean: Sequence[float], std: Sequence[float]
) -> int:
  """Checks the image shape and statistics; returns the number of channels."""
  if len(input_shape) != 3:
    raise ValueError(
      f"input_shape must be (height, width, channels), got {input_shape}."
    )
  channels = input_shape[-1]
  if len(mean) != channels or len(std) != channels:
    raise ValueError(
      f"mean={tuple(mean)} and std={tuple(std)} must have one entry per "
      f"channel of input_shape={tuple(input_shape)}."
    )
  return channels


def _standardize(
  images: jax.Array, mean: Sequence[float], std: Sequence[float]
) -> jax.Array:
  """Maps pixels on [0, 1] to zero mean and unit variance per channel."""
  mean = jnp.asarray(mean, images.dtype)
  std = jnp.asarray(std, images.dtype)
  return (images - mean) / std


class CNN(nnx.Module):
  """A small convolutional network, after Flax's ``examples/mnist``.

  Two 3x3 convolutions, each followed by a ReLU and 2x2 average pooling, then
  a hidden dense layer and the output layer.

  Args:
    num_classes: number of outputs.
    input_shape: ``(height, width, channels)``; height and width at least 4.
    mean: per-channel mean of the [0, 1] pixels.
    std: per-channel standard deviation of the [0, 1] pixels.
    features: output channels of the two convolutions.
    hidden: width of the hidden dense layer.
    dtype: the computation dtype (parameters are float32).
    rngs: random number generators for the initialisation.
  """

  layer_axes = None
  """The ``layer_axes`` of ``optax_lgm``: every leaf is one layer."""

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
    channels = _check_input(input_shape, mean, std)
    height, width = input_shape[0] // 4, input_shape[1] // 4
    if height < 1 or width < 1:
      raise ValueError(
        f"CNN needs images of at least 4x4 pixels, got input_shape={input_shape}."
      )
    self.mean, self.std = tuple(mean), tuple(std)
    self.conv1 = nnx.Conv(channels, features[0], (3, 3), dtype=dtype, rngs=rngs)
    self.conv2 = nnx.Conv(features[0], features[1], (3, 3), dtype=dtype, rngs=rngs)
    self.dense = nnx.Linear(
      height * width * features[1], hidden, dtype=dtype, rngs=rngs
    )
    self.head = nnx.Linear(hidden, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Returns the logits ``[B, num_classes]`` of images ``[B, H, W, C]``."""
    x = _standardize(images, self.mean, self.std)
    x = nnx.avg_pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))
    x = nnx.avg_pool(nnx.relu(self.conv2(x)), (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    return self.head(nnx.relu(self.dense(x)))

  @property
  def output_layers(self) -> tuple[str, ...]:
    """The two layers nearest the output, as ``layer_sam`` names them.

    A static step that perturbs only these costs about an SGD step: the start
    selection of `optax_lgm.StaticSelection` in `examples.train`.
    """
    return ("dense", "head")


def _conv3x3(
  in_features: int, out_features: int, strides: int, *, dtype, rngs: nnx.Rngs
) -> nnx.Conv:
  return nnx.Conv(
    in_features,
    out_features,
    (3, 3),
    strides,
    use_bias=False,
    kernel_init=nnx.initializers.he_normal(),
    dtype=dtype,
    rngs=rngs,
  )


def _batch_norm(num_features: int, *, dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(num_features, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)


class BasicBlock(nnx.Module):
  """A residual block of two 3x3 convolutions (He et al., 2016).

  Args:
    in_features: input channels.
    out_features: output channels.
    strides: stride of the first convolution and of the shortcut.
    shortcut: ``"padding"`` (option A of He et al.: the identity, subsampled
      and zero-padded to the new width where the shape changes; no
      parameters) or ``"projection"`` (option B: a strided 1x1 convolution
      and BatchNorm where the shape changes).
    dtype: the computation dtype (parameters are float32).
    rngs: random number generators for the initialisation.
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
    self.strides = strides
    self.conv1 = _conv3x3(in_features, out_features, strides, dtype=dtype, rngs=rngs)
    self.bn1 = _batch_norm(out_features, dtype=dtype, rngs=rngs)
    self.conv2 = _conv3x3(out_features, out_features, 1, dtype=dtype, rngs=rngs)
    self.bn2 = _batch_norm(out_features, dtype=dtype, rngs=rngs)
    reshapes = strides != 1 or in_features != out_features
    self.pad_features = out_features - in_features if shortcut == "padding" else 0
    if reshapes and shortcut == "projection":
      self.projection = nnx.Sequential(
        nnx.Conv(
          in_features,
          out_features,
          (1, 1),
          strides,
          use_bias=False,
          kernel_init=nnx.initializers.he_normal(),
          dtype=dtype,
          rngs=rngs,
        ),
        _batch_norm(out_features, dtype=dtype, rngs=rngs),
      )
    else:
      self.projection = None

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


class ResNet(nnx.Module):
  """The CIFAR ResNet of He et al. (2016), Section 4.2.

  A 3x3 convolution with ``width`` channels, then three stages of
  ``(depth - 2) / 6`` blocks (`BasicBlock`) with ``width``, ``2 * width`` and
  ``4 * width`` channels (the second and third start with stride 2), global
  average pooling and the output layer. ``depth=20`` and ``width=16`` is
  ResNet-20 (0.27M parameters with ``shortcut="padding"``).

  Args:
    num_classes: number of outputs.
    input_shape: ``(height, width, channels)``.
    mean: per-channel mean of the [0, 1] pixels.
    std: per-channel standard deviation of the [0, 1] pixels.
    depth: number of layers with weights, ``6 * n + 2`` (20, 32, 44, 56, ...).
    width: channels of the first stage.
    shortcut: ``"padding"`` (the paper's CIFAR choice, option A) or
      ``"projection"`` (option B); see `BasicBlock`.
    dtype: the computation dtype (parameters are float32).
    rngs: random number generators for the initialisation.

  References:
    He et al., `Deep Residual Learning for Image Recognition
    <https://arxiv.org/abs/1512.03385>`_, 2016.
  """

  layer_axes = None
  """The ``layer_axes`` of ``optax_lgm``: every leaf is one layer."""

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
    channels = _check_input(input_shape, mean, std)
    if depth < 8 or (depth - 2) % 6:
      raise ValueError(f"depth must be 6 * n + 2 with n >= 1, got depth={depth}.")
    if shortcut not in ("padding", "projection"):
      raise ValueError(
        f"shortcut must be 'padding' or 'projection', got shortcut={shortcut!r}."
      )
    self.mean, self.std = tuple(mean), tuple(std)
    self.conv = _conv3x3(channels, width, 1, dtype=dtype, rngs=rngs)
    self.bn = _batch_norm(width, dtype=dtype, rngs=rngs)
    blocks = []
    in_features = width
    for stage in range(3):
      out_features = width * 2**stage
      for i in range((depth - 2) // 6):
        strides = 2 if stage > 0 and i == 0 else 1
        blocks.append(
          BasicBlock(
            in_features, out_features, strides, shortcut, dtype=dtype, rngs=rngs
          )
        )
        in_features = out_features
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(in_features, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Returns the logits ``[B, num_classes]`` of images ``[B, H, W, C]``."""
    x = _standardize(images, self.mean, self.std)
    x = nnx.relu(self.bn(self.conv(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean(axis=(1, 2)))

  @property
  def output_layers(self) -> tuple[str, ...]:
    """The two layers nearest the output, as ``layer_sam`` names them.

    A static step that perturbs only these costs about an SGD step: the start
    selection of `optax_lgm.StaticSelection` in `examples.train`.
    """
    return (f"blocks/{len(self.blocks) - 1}/bn2", "head")


def resnet20(
  num_classes: int,
  input_shape: Sequence[int],
  mean: Sequence[float],
  std: Sequence[float],
  *,
  rngs: nnx.Rngs,
  **kwargs: Any,
) -> ResNet:
  """Returns a ResNet-20; ``kwargs`` go to `ResNet`."""
  return ResNet(num_classes, input_shape, mean, std, depth=20, rngs=rngs, **kwargs)


def resnet32(
  num_classes: int,
  input_shape: Sequence[int],
  mean: Sequence[float],
  std: Sequence[float],
  *,
  rngs: nnx.Rngs,
  **kwargs: Any,
) -> ResNet:
  """Returns a ResNet-32; ``kwargs`` go to `ResNet`."""
  return ResNet(num_classes, input_shape, mean, std, depth=32, rngs=rngs, **kwargs)


class EncoderBlock(nnx.Module):
  """A pre-LayerNorm transformer encoder block.

  ``x + attention(norm(x))``, then ``x + mlp(norm(x))`` with a GELU MLP.

  Args:
    dim: width of the token embeddings.
    num_heads: number of attention heads.
    mlp_dim: hidden width of the MLP.
    dtype: the computation dtype (parameters are float32).
    rngs: random number generators for the initialisation.
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
    """Applies the block to tokens ``[B, N, dim]``."""
    x = x + self.attention(self.attention_norm(x))
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.mlp_norm(x))))


class TransformerClassifier(nnx.Module):
  """A small vision transformer with mean pooling.

  Non-overlapping ``patch_size`` patches are embedded by a strided
  convolution and a learned position embedding is added; ``depth`` encoder
  blocks (`EncoderBlock`) follow, then a LayerNorm, the mean over tokens and
  the output layer.

  With ``stacked=True`` the blocks are created with ``nnx.vmap`` and applied
  with ``jax.lax.scan`` over their stacked state, as in a scanned
  (layer-stacked) transformer: ``blocks`` is then a single `EncoderBlock`
  whose every parameter has a leading axis of size ``depth``
  (``blocks/mlp_in/kernel`` of shape ``[depth, dim,
  mlp_dim]``), where the unstacked model has one `EncoderBlock` per index
  (``blocks/0/mlp_in/kernel`` of shape ``[dim, mlp_dim]``). The two compute
  the same function of the same weights. Pass ``layer_axes=model.layer_axes``
  to the transformations of ``optax_lgm`` so that each stacked block is a
  layer of its own (see `layer_axes`).

  Args:
    num_classes: number of outputs.
    input_shape: ``(height, width, channels)``, both sides multiples of
      ``patch_size``.
    mean: per-channel mean of the [0, 1] pixels.
    std: per-channel standard deviation of the [0, 1] pixels.
    patch_size: side of the square patches; ``None`` for 2 on images of at
      most 16 pixels a side (16 tokens on 8x8 digits) and 4 otherwise (49
      tokens on 28x28, 64 on 32x32).
    dim: width of the token embeddings.
    depth: number of encoder blocks.
    num_heads: number of attention heads.
    mlp_dim: hidden width of the MLPs.
    stacked: whether to stack the blocks along a leading axis (``nnx.vmap``
      and a scan) instead of keeping a list of them.
    dtype: the computation dtype (parameters are float32).
    rngs: random number generators for the initialisation.

  References:
    Dosovitskiy et al., `An Image is Worth 16x16 Words
    <https://arxiv.org/abs/2010.11929>`_, 2021.
  """

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
    channels = _check_input(input_shape, mean, std)
    height, width = input_shape[0], input_shape[1]
    if patch_size is None:
      patch_size = 2 if max(height, width) <= 16 else 4
    if height % patch_size or width % patch_size:
      raise ValueError(
        f"patch_size={patch_size} must divide the height and width of "
        f"input_shape={tuple(input_shape)}."
      )
    if stacked and depth < 1:
      raise ValueError(f"stacked=True needs depth >= 1, got depth={depth}.")
    self.mean, self.std = tuple(mean), tuple(std)
    self.patch_embedding = nnx.Conv(
      channels,
      dim,
      (patch_size, patch_size),
      patch_size,
      padding="VALID",
      dtype=dtype,
      rngs=rngs,
    )
    num_patches = (height // patch_size) * (width // patch_size)
    self.position_embedding = nnx.Param(
      nnx.initializers.normal(0.02)(rngs.params(), (1, num_patches, dim))
    )
    self.stacked = stacked
    if stacked:

      @nnx.split_rngs(splits=depth)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def create_blocks(rngs: nnx.Rngs) -> EncoderBlock:
        return EncoderBlock(dim, num_heads, mlp_dim, dtype=dtype, rngs=rngs)

      self.blocks = create_blocks(rngs)
    else:
      self.blocks = nnx.List(
        [
          EncoderBlock(dim, num_heads, mlp_dim, dtype=dtype, rngs=rngs)
          for _ in range(depth)
        ]
      )
    self.norm = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Returns the logits ``[B, num_classes]`` of images ``[B, H, W, C]``."""
    x = self.patch_embedding(_standardize(images, self.mean, self.std))
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
  def output_layers(self) -> tuple[str, ...]:
    """The two layers nearest the output, as ``layer_sam`` names them.

    A static step that perturbs only these costs about an SGD step: the start
    selection of `optax_lgm.StaticSelection` in `examples.train`.
    """
    return ("norm", "head")

  @property
  def layer_axes(self) -> Callable[[tuple, Any], int] | None:
    """The ``layer_axes`` of ``optax_lgm`` for ``nnx.state(model, nnx.Param)``.

    For a stacked model, a function ``(path, leaf) -> int`` that is 1 for the
    leaves under ``blocks`` (their leading axis indexes the blocks) and 0
    otherwise, so that every block is a layer of its own; ``None`` (every
    leaf one layer, or as ``layers`` groups them) for the unstacked model.
    The function is the same for every stacked model, so optimizers built
    with it hash the same.
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

  Args:
    name: one of `MODELS`.
    num_classes: number of outputs.
    input_shape: ``(height, width, channels)`` of one image.
    mean: per-channel mean of the [0, 1] pixels.
    std: per-channel standard deviation of the [0, 1] pixels.
    rngs: random number generators for the initialisation.
    **kwargs: further arguments of the model's constructor.

  Returns:
    The model, mapping ``[B, H, W, C]`` pixels on [0, 1] to logits.

  Raises:
    ValueError: if ``name`` is not one of `MODELS`.

  Examples:
    >>> from flax import nnx
    >>> model = create_model("cnn", 10, (8, 8, 1), (0.3,), (0.4,), nnx.Rngs(0))
    >>> model(jnp.zeros((2, 8, 8, 1))).shape
    (2, 10)
  """
  _check_name(name)
  return _CONSTRUCTORS[name](num_classes, input_shape, mean, std, rngs=rngs, **kwargs)
