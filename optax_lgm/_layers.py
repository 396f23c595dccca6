"""What a *layer* is: the grouping of a pytree's leaves that shares one statistic.

Every transformation of the library is built on :class:`Layering`, the static
(trace-time) description of how the leaves of a parameter tree group into
layers. Per-layer statistics are computed with a handful of fused reductions,
one per leaf, followed (only where several leaves or slices share a layer) by
one ``segment_sum``; no Python loop runs at step time.

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
from collections.abc import Callable, Hashable, Mapping, Sequence
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


def _is_none(x: Any) -> bool:
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
      f"{jax.tree.structure(tree, is_leaf=_is_none)}."
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

  def _segment_ids(self) -> np.ndarray:
    ids = [ids.reshape(-1) for ids in self.leaf_layers if ids is not None]
    return np.concatenate(ids) if ids else np.zeros([0], np.int32)

  def reduce(
    self,
    fn: Callable[[jax.Array], jax.Array],
    tree: Any,
    *,
    dtype: jax.typing.DTypeLike = jnp.float32,
  ) -> jax.Array:
    """Returns ``sum(fn(leaf))`` over the elements of each layer.

    Args:
      fn: an elementwise function applied to each leaf, cast to ``dtype``.
      tree: a tree with the structure of the layering.
      dtype: the dtype of the statistics.

    Returns:
      An array of shape ``[num_layers]`` and dtype ``dtype``.
    """
    parts = []
    for x, ids in zip(self.flatten(tree), self.leaf_layers):
      if ids is None:
        continue
      axes = tuple(range(ids.ndim, jnp.ndim(x)))
      parts.append(jnp.sum(fn(jnp.asarray(x).astype(dtype)), axis=axes).reshape(-1))
    if not parts:
      return jnp.zeros([self.num_layers], dtype)
    flat = jnp.concatenate(parts)
    seg = self._segment_ids()
    if np.array_equal(seg, np.arange(self.num_layers)):
      return flat
    return jax.ops.segment_sum(
      flat, jnp.asarray(seg), num_segments=self.num_layers, indices_are_sorted=False
    )

  def moments(
    self, tree: Any, *, dtype: jax.typing.DTypeLike = jnp.float32
  ) -> tuple[jax.Array, jax.Array]:
    """Population mean and variance of each layer's entries, in one pass.

    Each slice is shifted by its first entry before its sum and sum of squares
    are taken (so a constant layer has a variance of exactly zero and a large
    mean does not cancel the variance away), then the slices of a layer are
    merged with Chan's parallel formula.

    Args:
      tree: a tree with the structure of the layering.
      dtype: the dtype of the statistics.

    Returns:
      ``(mean, var)``, each of shape ``[num_layers]``.
    """
    shifts, s1s, s2s, counts = [], [], [], []
    for x, ids in zip(self.flatten(tree), self.leaf_layers):
      if ids is None:
        continue
      x = jnp.asarray(x).astype(dtype)
      a, ndim = ids.ndim, x.ndim
      shift = x[(slice(None),) * a + (0,) * (ndim - a)]
      d = x - shift.reshape(shift.shape + (1,) * (ndim - a))
      s1, s2 = _sum_and_sum_of_squares(d, tuple(range(a, ndim)))
      shifts.append(shift.reshape(-1))
      s1s.append(s1.reshape(-1))
      s2s.append(s2.reshape(-1))
      counts.append(np.full(ids.size, np.prod(x.shape[a:]), np.float64))
    if not s1s:
      zeros = jnp.zeros([self.num_layers], dtype)
      return zeros, zeros
    # The arithmetic on the sums runs once on [num_slices] vectors, not once
    # per leaf: fewer, shared kernels (compile time on many-leaf trees).
    n_s = jnp.asarray(np.concatenate(counts), dtype)
    s1, s2 = jnp.concatenate(s1s), jnp.concatenate(s2s)
    mean_s = jnp.concatenate(shifts) + s1 / n_s
    m2_s = jnp.maximum(s2 - s1 * s1 / n_s, 0.0)
    seg = self._segment_ids()
    sizes = jnp.asarray(self.sizes, dtype)
    if np.array_equal(seg, np.arange(self.num_layers)):
      return mean_s, m2_s / sizes
    seg_j = jnp.asarray(seg)
    mean = jax.ops.segment_sum(n_s * mean_s, seg_j, self.num_layers) / sizes
    spread = n_s * jnp.square(mean_s - mean[seg_j])
    m2 = jax.ops.segment_sum(m2_s + spread, seg_j, self.num_layers)
    return mean, m2 / sizes

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

  def check_names(
    self, names: "LayerNames", updates: Any = None, what: str = "the state"
  ) -> None:
    """Raises if ``updates`` are not shaped like the params given to ``init``.

    Runs at trace time on static shapes, so it costs nothing under ``jit``.

    Args:
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
    if names.names == self.names:
      return
    raise ValueError(
      f"The gradients have the layers {self.names} (structure {self.treedef}), "
      f"but {what} was initialised on params with the layers {names.names}; "
      "pass update a tree of the structure of the params given to init."
    )


_ONE_PASS_MAX = 8192
"""Longest axis summed sequentially by `_sum_and_sum_of_squares`."""


def _add_pairs(a: tuple, b: tuple) -> tuple:
  """The reducer of `_sum_and_sum_of_squares`: adds two (sum, sum of squares)."""
  return a[0] + b[0], a[1] + b[1]


def _sum_and_sum_of_squares(
  d: jax.Array, axes: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
  """``(sum(d), sum(d * d))`` over ``axes``, reading ``d`` once.

  Two ``jnp.sum`` calls read the leaf twice, and XLA:CPU splits each long
  reduction into a windowed one that materialises ``d`` first (four passes
  over the leaf). One variadic reduction over the last axis gives both
  partial sums in one pass; the partial sums (a leaf's size divided by its
  last axis) are then summed the same way when there are at most
  ``_ONE_PASS_MAX`` of them, pairwise otherwise. Only runs of at most
  ``_ONE_PASS_MAX`` entries are summed sequentially, which bounds the
  rounding error.
  """
  if not axes or d.shape[axes[-1]] > _ONE_PASS_MAX:
    return jnp.sum(d, axis=axes), jnp.sum(d * d, axis=axes)
  zero = jnp.zeros([], d.dtype)
  p1, p2 = jax.lax.reduce(
    (d, d * d),
    (zero, zero),
    _add_pairs,
    axes[-1:],
  )
  rest = axes[:-1]
  if not rest or np.prod([d.shape[i] for i in rest]) > _ONE_PASS_MAX:
    return jnp.sum(p1, axis=rest), jnp.sum(p2, axis=rest)
  # Few partial sums: one more variadic reduction (one kernel, not two).
  return jax.lax.reduce((p1, p2), (zero, zero), _add_pairs, rest)


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

  def __call__(self, tree: Any) -> "Layering":
    """The :class:`Layering` of ``tree`` (see :func:`make_layering`)."""
    return _make_layering(tree, self)


def make_layering(
  tree: Any,
  layers: Layers = "leaf",
  *,
  layer_axes: LayerAxes = None,
  mask: Mask = None,
) -> Layering:
  """Groups the leaves of ``tree`` into layers.

  Args:
    tree: a pytree of arrays (params or updates); only shapes and paths are
      read.
    layers: ``"leaf"``, ``"module"``, or a callable ``(path, leaf) -> label``.
    layer_axes: number of leading axes that index separate layers: an int,
      a callable ``(path, leaf) -> int`` or a pytree of ints like ``tree``.
    mask: a pytree of booleans like ``tree`` or a callable returning one;
      leaves where it is ``False`` carry no statistic.

  Returns:
    The :class:`Layering` of ``tree``.

  Raises:
    ValueError: for an unknown ``layers``, a ``layer_axes`` larger than a
      leaf's rank, or a mask that does not match the tree.
  """
  return LayerSpec(layers, layer_axes, mask)(tree)


def _make_layering(tree: Any, spec: LayerSpec) -> Layering:
  """The work of :func:`make_layering`, for a checked ``spec``."""
  layers, layer_axes, mask = spec.layers, spec.layer_axes, spec.mask
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)
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
  return make_layering(params, layers, layer_axes=layer_axes, mask=mask).names


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


def leaf_shapes(tree: Any) -> tuple[tuple[str, tuple[int, ...] | None], ...]:
  """``(path name, shape)`` of every leaf of ``tree``; ``None`` leaves kept."""
  with_path, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)
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


def top_k_mask(values: jax.Array, k: int | None) -> jax.Array:
  """Boolean ``[num_layers]`` mask of the ``k`` largest ``values``.

  Ties go to the lower index; ``k=None`` or ``k >= len(values)`` selects all.

  Args:
    values: per-layer scores, shape ``[num_layers]``.
    k: how many layers to select.

  Returns:
    A boolean array of the same shape as ``values``.
  """
  n = values.shape[0]
  if k is None or k >= n:
    return jnp.ones([n], bool)
  _, idx = jax.lax.top_k(values, k)
  return jnp.zeros([n], bool).at[idx].set(True)
