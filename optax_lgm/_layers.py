"""What a *layer* is: the grouping of a pytree's leaves that shares one statistic.

Every transformation of the library keeps a :class:`LayerSpec` (what a layer
is, checked when the transformation is built) and calls it on the tree given
to ``init`` or ``update``; that gives the tree's :class:`Layering`, the static
(trace-time) description of how its leaves group into layers. Per-layer sums
and moments are in ``_reductions.py``, what a state keeps about its layers in
``_state_names.py``.

A layer is chosen by ``layers``:

* ``"leaf"``: every array leaf is a layer (optax's own convention).
* ``"module"``: the leaves under the same parent share a layer (``kernel`` and
  ``bias`` of one ``Dense``). Flax NNX paths that end in ``.value`` are
  understood, as are Linen and plain dict trees.
* a callable ``(path, leaf) -> label``: leaves with equal (hashable) labels form
  one layer; ``None`` leaves the leaf out.

``layer_axes`` says how many leading axes of a leaf index *separate* layers
(stacked or scanned layers): an ``int`` for every leaf, a callable
``(path, leaf) -> int``, or a pytree of ints shaped like the params.

``mask`` (a pytree of booleans or a callable returning one, as in
:func:`optax.masked`) says which leaves take part. Leaves outside it, ``None``
leaves, non-float leaves and leaves (or slices) with fewer than two elements
carry no statistic: transformations pass them through unchanged.
"""

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

LayerFn = Callable[[tuple, Any], Union[Hashable, None]]
Layers = Union[str, LayerFn]
LayerAxes = Union[int, None, Callable[[tuple, Any], int], Any]
Mask = Union[None, Any, Callable[[Any], Any]]

_LAYERS_STRINGS = ("leaf", "module")
_VARIABLE_ATTRS = ("value", "raw_value")
ROOT_NAME = "(root)"


def is_none(x: Any) -> bool:
  """Whether ``x`` is ``None`` (the ``is_leaf`` that keeps ``None`` leaves)."""
  return x is None


def _key_name(key: Any) -> str:
  """Returns the plain name of one entry of a JAX key path."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def strip_path(path: tuple) -> tuple:
  """Drops a trailing ``.value`` (a Flax NNX ``Variable``) from a key path."""
  while (
    path
    and isinstance(path[-1], jax.tree_util.GetAttrKey)
    and (path[-1].name in _VARIABLE_ATTRS)
  ):
    path = path[:-1]
  return path


def path_name(path: tuple) -> str:
  """Returns ``'a/b/c'`` for a key path, ignoring a trailing NNX ``.value``."""
  names = [_key_name(k) for k in strip_path(path)]
  return "/".join(names) if names else ROOT_NAME


def check_layers(layers: Layers) -> None:
  """Raises a ``ValueError`` unless ``layers`` is a known string or callable."""
  if callable(layers):
    return
  if not isinstance(layers, str) or layers not in _LAYERS_STRINGS:
    raise ValueError(
      f"layers must be one of {_LAYERS_STRINGS} or a callable "
      f"(path, leaf) -> label, got layers={layers!r}."
    )


def check_layer_axes(layer_axes: LayerAxes) -> None:
  """Raises a ``ValueError`` for a negative or non-integer ``layer_axes``."""
  if layer_axes is None or callable(layer_axes):
    return
  if isinstance(layer_axes, (bool, float)):
    raise ValueError(f"layer_axes must be a non-negative int, got {layer_axes!r}.")
  if isinstance(layer_axes, int) and layer_axes < 0:
    raise ValueError(f"layer_axes must be a non-negative int, got {layer_axes!r}.")


def _label(layers: Layers, path: tuple, leaf: Any) -> Hashable | None:
  path = strip_path(path)
  if layers == "leaf":
    return path_name(path)
  if layers == "module":
    return path_name(path[:-1]) if len(path) > 1 else path_name(path)
  assert callable(layers)  # Checked by check_layers.
  return layers(path, leaf)


def flatten_like(treedef: Any, tree: Any, what: str, like: str) -> list:
  """Flattens ``tree`` up to ``treedef``; on a mismatch names both structures.

  Args:
    treedef: the structure expected.
    tree: the tree to flatten.
    what: the tree's name, for the message.
    like: what has the structure ``treedef``, for the message.

  Returns:
    The subtrees of ``tree`` at the leaves of ``treedef``.
  """
  try:
    return treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(
      f"{what} must have the structure of {like}, {treedef}; got "
      f"{jax.tree.structure(tree, is_leaf=is_none)}."
    ) from e


@dataclasses.dataclass(frozen=True, eq=False)
class Layering:
  """How the leaves of one pytree group into layers (static, trace-time).

  Attributes:
    names: one name per layer, in a stable order (the order of first
      appearance among the leaves, as ``jax.tree.flatten`` orders them).
    treedef: the structure of the tree (``None`` counts as a leaf).
    leaf_layers: per flat leaf, an integer array of layer indices of shape
      ``leaf.shape[:layer_axes]``, or ``None`` when the leaf carries no
      statistic.
    sizes: number of elements of each layer, shape ``[num_layers]``.
  """

  names: tuple[str, ...]
  treedef: Any
  leaf_layers: tuple[np.ndarray | None, ...]
  sizes: np.ndarray

  @property
  def num_layers(self) -> int:
    """The number of layers."""
    return len(self.names)

  def flatten(self, tree: Any) -> list:
    """Flattens a tree of this structure (``None`` leaves kept)."""
    return self.treedef.flatten_up_to(tree)

  def unflatten(self, leaves: Sequence[Any]) -> Any:
    """Inverse of :meth:`flatten`."""
    return self.treedef.unflatten(leaves)

  def segment_ids(self) -> np.ndarray:
    """The layer of each slice, in the order of :attr:`leaf_layers`."""
    ids = [ids.reshape(-1) for ids in self.leaf_layers if ids is not None]
    return np.concatenate(ids) if ids else np.zeros([0], np.int32)

  def expand(self, values: Any, index: int, ndim: int) -> Any:
    """Broadcasts per-layer ``values`` to flat leaf ``index`` of rank ``ndim``.

    Args:
      values: an array whose leading axis has length ``num_layers`` (a NumPy
        array gives a NumPy array).
      index: the position of the leaf in :meth:`flatten`'s order.
      ndim: the rank of that leaf.

    Returns:
      ``values[ids]`` with trailing singleton axes, broadcastable to the leaf.
    """
    ids = self.leaf_layers[index]
    if ids is None:
      raise ValueError(f"Leaf {index} carries no statistic.")
    if isinstance(values, np.ndarray):  # Static: index on the host.
      return values[ids].reshape(ids.shape + (1,) * (ndim - ids.ndim))
    if ids.ndim:
      out = jnp.take(values, jnp.asarray(ids), axis=0)
    elif values.ndim == 1 and values.dtype in (jnp.bool_, jnp.float32):
      # A dot with a one-hot row rather than a slice: XLA fuses a slice into
      # the leaf's elementwise kernel, which makes that kernel differ from
      # leaf to leaf (one compilation per leaf instead of one per leaf
      # shape), while a dot stays outside it. Exact for these dtypes.
      one_hot = np.zeros(len(values), np.float32)
      one_hot[int(ids)] = 1.0
      out = jnp.dot(one_hot, values.astype(jnp.float32)).astype(values.dtype)
    else:
      out = values[int(ids)]
    return out.reshape(ids.shape + (1,) * (ndim - ids.ndim))

  def map(
    self,
    fn: Callable[..., Any],
    tree: Any,
    *rest: Any,
    per_layer: Sequence[Any] = (),
    missing: Callable[..., Any] | None = None,
  ) -> Any:
    """Maps ``fn`` over the leaves that carry a statistic.

    Args:
      fn: called as ``fn(leaf, *rest_leaves, *per_layer_values)`` where each
        per-layer value is broadcastable to the leaf.
      tree: a tree with the structure of the layering.
      *rest: more trees of the same structure.
      per_layer: arrays of shape ``[num_layers]``, expanded for each leaf
        (NumPy arrays stay NumPy arrays: static values).
      missing: called as ``missing(leaf, *rest_leaves)`` on the leaves that
        carry no statistic; ``None`` returns ``leaf`` unchanged.

    Returns:
      A tree like ``tree``; ``None`` leaves stay ``None``.
    """
    flat = [self.flatten(t) for t in (tree,) + rest]
    out: list[Any] = []
    for i, (leaves, ids) in enumerate(zip(zip(*flat), self.leaf_layers)):
      if leaves[0] is None:
        out.append(None)
      elif ids is None:
        out.append(leaves[0] if missing is None else missing(*leaves))
      else:
        ndim = jnp.ndim(leaves[0])
        out.append(fn(*leaves, *(self.expand(v, i, ndim) for v in per_layer)))
    return self.unflatten(out)

  def restrict(self, selected: np.ndarray) -> "Layering":
    """The same layering where only the leaves of ``selected`` layers count.

    Args:
      selected: a static boolean array of shape ``[num_layers]``.

    Returns:
      A :class:`Layering` with the same layers, in which a leaf none of whose
      slices is selected carries no statistic.
    """
    leaf_layers = tuple(
      None if ids is None or not selected[ids].any() else ids
      for ids in self.leaf_layers
    )
    return dataclasses.replace(self, leaf_layers=leaf_layers)

  def flatten_as(self, tree: Any, what: str) -> list:
    """:meth:`flatten`, with an error naming both structures on a mismatch."""
    return flatten_like(self.treedef, tree, what, "the gradients")


@dataclasses.dataclass(frozen=True, eq=False)
class LayerSpec:
  """What a layer is: ``(layers, layer_axes, mask)``, checked once.

  Every factory of the library keeps one and calls it on the tree given to
  ``init`` or ``update`` to get that tree's :class:`Layering`.

  Attributes:
    layers: ``"leaf"``, ``"module"``, or a callable ``(path, leaf) -> label``.
    layer_axes: number of leading axes that index separate layers: an int,
      a callable ``(path, leaf) -> int`` or a pytree of ints like the params.
    mask: a pytree of booleans like the params or a callable returning one;
      leaves where it is ``False`` carry no statistic.
  """

  layers: Layers = "leaf"
  layer_axes: LayerAxes = None
  mask: Mask = None

  def __post_init__(self) -> None:
    check_layers(self.layers)
    check_layer_axes(self.layer_axes)

  def __call__(self, tree: Any) -> Layering:
    """Groups the leaves of ``tree`` into layers.

    Args:
      tree: a pytree of arrays (params or updates); only shapes and paths are
        read.

    Returns:
      The :class:`Layering` of ``tree``.

    Raises:
      ValueError: for a ``layer_axes`` larger than a leaf's rank, or a mask
        or ``layer_axes`` tree that does not match ``tree``.
    """
    layers, layer_axes, mask = self.layers, self.layer_axes, self.mask
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_none)
    if mask is None:
      mask_leaves = [True] * len(with_path)
    else:
      mask_tree = mask(tree) if callable(mask) else mask
      mask_leaves = flatten_like(treedef, mask_tree, "mask", "the params")
    if layer_axes is None or isinstance(layer_axes, int) or callable(layer_axes):
      axes_leaves = [layer_axes] * len(with_path)
    else:
      axes_leaves = flatten_like(treedef, layer_axes, "layer_axes", "the params")

    index: dict[Hashable, int] = {}
    names: list[str] = []
    sizes: list[int] = []
    leaf_layers: list[np.ndarray | None] = []
    for (path, leaf), keep, axes in zip(with_path, mask_leaves, axes_leaves):
      if callable(axes):
        axes = axes(strip_path(path), leaf)
      axes = 0 if axes is None else axes
      if leaf is None or not keep:
        leaf_layers.append(None)
        continue
      shape = tuple(np.shape(leaf))
      if not isinstance(axes, (int, np.integer)) or not 0 <= axes <= len(shape):
        raise ValueError(
          f"layer_axes must be an int between 0 and the rank of every leaf, "
          f"got layer_axes={axes!r} for leaf {path_name(path)!r} of shape {shape}."
        )
      dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
      slice_size = int(np.prod(shape[axes:], dtype=np.int64))
      label = _label(layers, path, leaf)
      if label is None or slice_size < 2 or not jnp.issubdtype(dtype, jnp.inexact):
        leaf_layers.append(None)
        continue
      ids = np.zeros(shape[:axes], np.int32)
      for pos in np.ndindex(*shape[:axes]):
        key = (label, pos)
        if key not in index:
          index[key] = len(names)
          name = label if isinstance(label, str) else str(label)
          names.append(name + (f"[{','.join(map(str, pos))}]" if pos else ""))
          sizes.append(0)
        ids[pos] = index[key]
        sizes[index[key]] += slice_size
      leaf_layers.append(ids)
    return Layering(
      names=tuple(names),
      treedef=treedef,
      leaf_layers=tuple(leaf_layers),
      sizes=np.asarray(sizes, np.int64),
    )


def layer_names(
  params: Any,
  layers: Layers = "leaf",
  *,
  layer_axes: LayerAxes = None,
  mask: Mask = None,
) -> tuple[str, ...]:
  """Names of the layers of ``params``, in the order the library reports them.

  The order is that of the per-layer arrays in every state of the library
  (``[num_layers]`` shaped statistics) and of the indices taken by
  :func:`optax_lgm.layer_sam`'s ``selection``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_lgm
    >>> params = {'dense': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones(2)}}
    >>> optax_lgm.layer_names(params)
    ('dense/bias', 'dense/kernel')
    >>> optax_lgm.layer_names(params, layers='module')
    ('dense',)

  Args:
    params: the parameter pytree.
    layers: ``"leaf"``, ``"module"`` or a callable ``(path, leaf) -> label``.
    layer_axes: leading axes of a leaf that index separate layers.
    mask: which leaves take part (a pytree of booleans or a callable).

  Returns:
    A tuple of layer names.
  """
  return LayerSpec(layers, layer_axes, mask)(params).names
