"""Converts TransformerClassifier parameters between its two layouts (for tests).

`stack_params` turns the parameters of the unstacked model (``blocks/0``,
``blocks/1``, ...) into those of the stacked one (one ``blocks`` entry whose
leaves have a leading axis of size ``depth``); `unstack_params` is the
inverse. They work on ``nnx.state(model, nnx.Param)`` and on any tree shaped
like it (gradients, updates, ``nnx.to_pure_dict`` of it).
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def _with_blocks(params: Mapping[Any, Any], blocks: Mapping[Any, Any]) -> Any:
  """``params`` with its ``blocks`` entry replaced, of the same mapping type."""
  out = dict(params)
  out["blocks"] = blocks
  if not isinstance(params, nnx.State):
    return out
  # Rebuilt from its flat form: nested the way nnx.state and nnx.split nest it.
  return nnx.from_flat_state(nnx.to_flat_state(nnx.State(out)))


def _blocks(params: Mapping[Any, Any]) -> Any:
  if not isinstance(params, Mapping) or "blocks" not in params:
    raise ValueError(
      "Expected the parameters of a TransformerClassifier, a mapping with a "
      f"'blocks' entry, got {type(params).__name__}."
    )
  return params["blocks"]


def stack_params(params: Mapping[Any, Any]) -> Any:
  """Converts parameters of the unstacked `TransformerClassifier` to stacked.

  The leaves under ``blocks/0``, ``blocks/1``, ... are stacked along a new
  leading axis under ``blocks``; the other entries are kept. Works on
  ``nnx.state(model, nnx.Param)`` and on any tree shaped like it (gradients,
  updates, ``nnx.to_pure_dict`` of it).

  Args:
    params: a mapping with a ``blocks`` entry that maps ``0, 1, ...`` to the
      parameters of one `EncoderBlock` each.

  Returns:
    The same mapping type, with ``blocks`` the parameters of one
    `EncoderBlock` whose leaves have a leading axis of size ``depth``.
  """
  blocks = _blocks(params)
  if sorted(blocks) != list(range(len(blocks))) or not blocks:
    raise ValueError(
      f"stack_params needs blocks indexed 0, 1, ..., got keys {list(blocks)}."
    )
  parts = [blocks[i] for i in range(len(blocks))]
  return _with_blocks(params, jax.tree.map(lambda *xs: jnp.stack(xs), *parts))


def unstack_params(params: Mapping[Any, Any]) -> Any:
  """Converts parameters of the stacked `TransformerClassifier` to unstacked.

  The inverse of `stack_params`: slice ``i`` of the leading axis of every
  leaf under ``blocks`` goes to ``blocks/i``.

  Args:
    params: a mapping with a ``blocks`` entry whose leaves share a leading
      axis of size ``depth``.

  Returns:
    The same mapping type, with ``blocks`` mapping ``0, ..., depth - 1`` to
    the parameters of one `EncoderBlock` each.
  """
  blocks = _blocks(params)
  sizes = {jnp.shape(x)[0] for x in jax.tree.leaves(blocks) if jnp.ndim(x)}
  if len(sizes) != 1:
    raise ValueError(
      "unstack_params needs the leaves under 'blocks' to share a leading axis, "
      f"got leading sizes {sorted(sizes)}."
    )
  (depth,) = sizes
  parts = {i: jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(depth)}
  return _with_blocks(
    params, nnx.State(parts) if isinstance(blocks, nnx.State) else parts
  )
