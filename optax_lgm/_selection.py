"""Which layers to perturb or keep: ``k``, top-k, and static selections."""

from collections.abc import Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from optax_lgm import _layers

Selection = Optional[Sequence[Union[int, str]]]


def check_k(k: Any) -> None:
  """Raises a ``ValueError`` for a ``k`` that is not ``None`` or an int >= 1."""
  if k is None or isinstance(k, (jax.Array, np.ndarray)):
    return  # An array is an injected hyperparameter; checked where concrete.
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be None (every layer) or an int >= 1, got k={k!r}.")


def _concrete_int(k: Any) -> Optional[int]:
  """``k`` as a Python int where it is known at trace time, else ``None``."""
  if k is None or isinstance(k, jax.core.Tracer):
    return None
  return int(np.asarray(k))


def check_k_fits(k: Any, num_layers: int) -> None:
  """Raises a ``ValueError`` if a known ``k`` exceeds the number of layers."""
  value = _concrete_int(k)
  if value is None:
    return
  if value < 1:
    raise ValueError(f"k must be None (every layer) or an int >= 1, got k={value}.")
  # An empty tree has nothing to select; any k is then harmless.
  if num_layers and value > num_layers:
    raise ValueError(
      f"k={value} is larger than the number of layers of the params "
      f"({num_layers}); pass k=None to select every layer."
    )


def top_k(norms: jax.Array, k: Any) -> jax.Array:
  """Boolean mask of the ``k`` largest ``norms``; ties go to the lower index."""
  n = norms.shape[0]
  if k is None:
    return jnp.ones([n], bool)
  if isinstance(k, (int, np.integer)):
    if k >= n:
      return jnp.ones([n], bool)
    _, idx = jax.lax.top_k(norms, int(k))
    return jnp.zeros([n], bool).at[idx].set(True)
  # A traced k (optax.inject_hyperparams): rank the layers, O(num_layers^2).
  idx = jnp.arange(n)
  before = (norms[None, :] > norms[:, None]) | (
    (norms[None, :] == norms[:, None]) & (idx[None, :] < idx[:, None])
  )
  return jnp.sum(before, axis=1) < k


def largest(norms: np.ndarray, k: int) -> tuple[int, ...]:
  """On the host: the indices of the ``k`` largest ``norms``, sorted.

  Ties go to the lower index, as in the graph's `top_k`.
  """
  if k > norms.shape[0]:
    raise ValueError(f"k={k} is larger than the number of layers ({norms.shape[0]}).")
  order = np.argsort(-norms, kind="stable")[:k]
  return tuple(sorted(int(i) for i in order))


def layer_index(
  item: Any, selection: Any, names: tuple[str, ...], argument: str = "selection"
) -> int:
  """The layer index of one entry (an index or a name) of ``argument``."""
  n = len(names)
  if isinstance(item, str):
    if item not in names:
      raise ValueError(
        f"{argument} names a layer {item!r} that the params do not have; "
        f"the layers are {names}."
      )
    return names.index(item)
  if isinstance(item, jax.core.Tracer):
    raise ValueError(
      f"selection is traced ({type(item).__name__} in place of a layer index): "
      "make it a static argument of the jitted step, "
      "nnx.jit(step, static_argnames='selection') or "
      "jax.jit(step, static_argnames='selection')."
    )
  if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
    raise ValueError(
      f"{argument} must hold layer indices (ints) or names (str), got "
      f"{item!r} in {argument}={selection!r}."
    )
  if not 0 <= item < n:
    raise ValueError(
      f"{argument} holds the index {int(item)}, out of range for {n} layers "
      f"(valid indices: 0 to {n - 1}), in {argument}={selection!r}."
    )
  return int(item)


def static_mask(selection: Any, layering: _layers.Layering) -> np.ndarray:
  """Turns a static ``selection`` (indices or names) into a boolean NumPy mask.

  Args:
    selection: a tuple (or list) of layer indices or names.
    layering: the layering of the gradients.

  Returns:
    A boolean array of shape ``[num_layers]``.

  Raises:
    ValueError: for a selection that is not a tuple of indices or names, that
      is empty, names a layer twice, or holds an unknown layer.
  """
  if isinstance(selection, (jax.Array, jax.core.Tracer)) or not isinstance(
    selection, (tuple, list, np.ndarray)
  ):
    raise ValueError(
      "selection must be None (dynamic mode) or a tuple of layer indices or "
      "names, hashable so that it can be a static argument of the jitted step "
      "(jax.jit(step, static_argnames='selection'), or nnx.jit with the same "
      "static_argnames='selection'), got "
      f"selection={selection!r} of type {type(selection).__name__}."
    )
  if len(selection) == 0 and layering.num_layers:
    raise ValueError(
      "selection must name at least one layer, got selection=() (to perturb "
      "no layer, use the wrapped optimizer alone)."
    )
  indices = [layer_index(item, selection, layering.names) for item in selection]
  if len(set(indices)) != len(indices):
    raise ValueError(
      f"selection names a layer more than once, got selection={selection!r} "
      f"(layer indices {indices})."
    )
  mask = np.zeros([layering.num_layers], bool)
  mask[indices] = True
  return mask
