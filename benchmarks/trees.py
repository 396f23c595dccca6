"""Parameter pytrees of realistic structure for the update-cost benchmarks.

`resnet50_shapes` (a bottleneck ResNet for ImageNet) and `many_leaves_shapes`
(a stack of transformer blocks), as nested dicts named as Flax names them
(``kernel``, ``bias``, ``scale``), so that ``layers="module"`` groups them as it
would a Flax model.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Shapes = dict[str, Any]


def _is_shape(x: Any) -> bool:
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


BOTTLENECK_BLOCKS = {
  14: (1, 1, 1, 1), 26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
  152: (3, 8, 36, 3),
}  # fmt: skip
"""The blocks per stage of a bottleneck ResNet of each depth."""


def resnet50_shapes(width: float = 1.0, depth: int = 50) -> Shapes:
  """The parameter shapes of a bottleneck ResNet (He et al., 2016) for ImageNet.

  ResNet-50 by default (161 leaves, 25.6M parameters); ``width`` multiplies the
  channels, ``depth`` is one of `BOTTLENECK_BLOCKS`.
  """
  if depth not in BOTTLENECK_BLOCKS:
    raise ValueError(f"depth must be one of {sorted(BOTTLENECK_BLOCKS)}, got {depth}.")

  def c(n: int) -> int:
    return max(1, round(n * width))

  def norm(n: int) -> Shapes:
    return {"scale": (n,), "bias": (n,)}

  tree: Shapes = {"stem": {"conv": {"kernel": (7, 7, 3, c(64))}, "bn": norm(c(64))}}
  cin = c(64)
  for stage, blocks in enumerate(BOTTLENECK_BLOCKS[depth]):
    mid = 64 * 2**stage  # 64, 128, 256, 512.
    for b in range(blocks):
      out = c(4 * mid)
      block = {
        "conv1": {"kernel": (1, 1, cin, c(mid))},
        "bn1": norm(c(mid)),
        "conv2": {"kernel": (3, 3, c(mid), c(mid))},
        "bn2": norm(c(mid)),
        "conv3": {"kernel": (1, 1, c(mid), out)},
        "bn3": norm(out),
      }
      if b == 0:
        block["projection"] = {"kernel": (1, 1, cin, out)}
        block["projection_bn"] = norm(out)
      tree[f"stage{stage + 1}_block{b}"] = block
      cin = out
  tree["head"] = {"kernel": (cin, 1000), "bias": (1000,)}
  return tree


def many_leaves_shapes(n_leaves: int = 1000, dim: int = 64) -> Shapes:
  """About ``n_leaves`` leaves: pre-LayerNorm transformer blocks of width ``dim``.

  16 leaves a block (four attention projections, two norms, a two-layer MLP,
  with biases), an embedding, a final norm and a classifier.
  """
  tree: Shapes = {"embedding": {"embedding": (1000, dim)}}
  for b in range(max(1, round((n_leaves - 5) / 16))):
    block: Shapes = {
      name: {"kernel": (dim, dim), "bias": (dim,)}
      for name in ("query", "key", "value", "out")
    }
    block["norm1"] = {"scale": (dim,), "bias": (dim,)}
    block["norm2"] = {"scale": (dim,), "bias": (dim,)}
    block["mlp_in"] = {"kernel": (dim, 4 * dim), "bias": (4 * dim,)}
    block["mlp_out"] = {"kernel": (4 * dim, dim), "bias": (dim,)}
    tree[f"block{b:03d}"] = block
  tree["final_norm"] = {"scale": (dim,), "bias": (dim,)}
  tree["head"] = {"kernel": (dim, 10), "bias": (10,)}
  return tree


def materialize(shapes: Shapes, seed: int, scale: float = 0.02) -> Any:
  """Normal random float32 arrays of the given shapes."""
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
  rng = np.random.default_rng(seed)  # NumPy: no compilation per leaf shape.
  arrays = [jnp.asarray(scale * rng.standard_normal(s, np.float32)) for s in leaves]
  return jax.block_until_ready(treedef.unflatten(arrays))


def abstract(shapes: Shapes) -> Any:
  """``jax.ShapeDtypeStruct`` float32 leaves of the given shapes (no memory)."""
  return jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s, np.float32), shapes, is_leaf=_is_shape
  )
