"""What a state keeps about its layers: their names and the params' shapes.

Every state of the library carries a :class:`LayerNames`: static (no array
leaves), so ``jit``, ``apply_if_finite`` and checkpoints see only the arrays
beside it. ``update`` checks its gradients against it and names the first
leaf that differs from the params given to ``init``.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from optax_lgm._layers import Layering, is_none, path_name


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class LayerNames:
  """Static (non-array) layer names carried inside an optimizer state.

  It has no array leaves, so ``jit``, ``apply_if_finite`` and checkpointing see
  only the arrays next to it; the names travel in the tree structure. With
  the names it keeps the path and shape of each leaf of the params given to
  ``init``, so that ``update`` can say which leaf of the gradients differs.
  """

  names: tuple[str, ...] = ()
  leaves: tuple[tuple[str, tuple[int, ...] | None], ...] = ()
  """The path and shape of every leaf of the params given to ``init``
  (``None`` for a ``None`` leaf), against which ``update`` checks its
  gradients; empty: not checked."""

  def __len__(self) -> int:
    return len(self.names)


class _PlaceholderLayerNames(LayerNames):
  """The names in a state built on :func:`optax.tree.map_params`' placeholder.

  :func:`optax.tree.map_params` initialises the optimizer on a placeholder
  that is not an array, then maps over that state and the real one together; its
  result takes its structure from the placeholder's state. There, the names
  are unknown. A subclass is not registered as a pytree node, so this object
  is a *leaf*: ``map_params`` hands it the real state's :class:`LayerNames`
  and returns that (or ``transform_non_params`` of it), and the names survive.
  """


def is_params_placeholder(tree: Any) -> bool:
  """Whether ``tree`` stands in for params without being them.

  :func:`optax.tree.map_params` initialises the optimizer on such a stand-in:
  an object that is neither a container (a mapping, a sequence, ``None``) nor
  an array, and that flattens to no leaves.
  """
  if tree is None or isinstance(tree, (Mapping, Sequence)) or hasattr(tree, "shape"):
    return False
  return not jax.tree.leaves(tree)


def state_names(params: Any, layering: Layering) -> LayerNames:
  """The :class:`LayerNames` to keep in a state initialised on ``params``.

  Args:
    params: the tree given to ``init``.
    layering: its :class:`Layering`.

  Returns:
    ``LayerNames`` with the layer names and the leaves' paths and shapes;
    on the placeholder of :func:`optax.tree.map_params`, a leaf that stands
    for the real names.
  """
  if is_params_placeholder(params):
    return _PlaceholderLayerNames()
  return LayerNames(layering.names, leaf_shapes(params))


def check_names(
  lay: Layering, names: LayerNames, updates: Any = None, what: str = "the state"
) -> None:
  """Raises if ``updates`` are not shaped like the params given to ``init``.

  Runs at trace time on static shapes, so it costs nothing under ``jit``.

  Args:
    lay: the :class:`Layering` of ``updates``.
    names: the :class:`LayerNames` kept in a state.
    updates: the tree given to ``update`` (``None``: check the layers only).
    what: what holds them, for the message.

  Raises:
    ValueError: naming the first leaf whose path or shape differs from the
      params given to ``init``, or both lists of layers.
  """
  if isinstance(names, _PlaceholderLayerNames):
    return
  if updates is not None and names.leaves:
    check_like_init(names.leaves, updates)
  if names.names == lay.names:
    return
  raise ValueError(
    f"The gradients have the layers {lay.names} (structure {lay.treedef}), "
    f"but {what} was initialised on params with the layers {names.names}; "
    "pass update a tree of the structure of the params given to init."
  )


def leaf_shapes(tree: Any) -> tuple[tuple[str, tuple[int, ...] | None], ...]:
  """``(path name, shape)`` of every leaf of ``tree``; ``None`` leaves kept."""
  with_path, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_none)
  return tuple(
    (path_name(path), None if leaf is None else tuple(np.shape(leaf)))
    for path, leaf in with_path
  )


def _some(names: list[str], most: int = 3) -> str:
  """``names`` for a message: the first ``most`` of them, and how many more."""
  shown = ", ".join(repr(name) for name in names[:most])
  return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def check_like_init(
  expected: tuple[tuple[str, tuple[int, ...] | None], ...], updates: Any
) -> None:
  """Raises a ``ValueError`` naming the first leaf that differs from ``init``'s.

  Args:
    expected: :func:`leaf_shapes` of the params given to ``init``.
    updates: the gradients given to ``update``.
  """
  got = leaf_shapes(updates)
  if got == expected:
    return
  fix = "pass update gradients of the tree and shapes of the params given to init"
  want, have = dict(expected), dict(got)
  missing = [name for name in want if name not in have]
  extra = [name for name in have if name not in want]
  if missing or extra:
    differences = []
    if missing:
      differences.append(f"lack the leaves {_some(missing)} of init's params")
    if extra:
      differences.append(f"have leaves {_some(extra)} that init's params do not")
    raise ValueError(
      f"The gradients {' and '.join(differences)} ({len(got)} leaves, init had "
      f"{len(expected)}); {fix}."
    )
  for name, shape in got:
    if shape != want[name]:
      raise ValueError(
        f"The gradients' leaf {name!r} has shape {shape}, but the params given "
        f"to init had shape {want[name]} there; {fix}."
      )
  raise ValueError(f"The gradients' leaves are in another order than init's; {fix}.")


def prefixed(state: Any, prefix: str, fields: Sequence[str]) -> dict[str, Any]:
  """``{prefix + field: state.field}``: a state's per-layer arrays to log."""
  return {prefix + field: getattr(state, field) for field in fields}
