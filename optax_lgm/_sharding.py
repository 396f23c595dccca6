"""Averages over a mapped data axis and ``shard_map``'s varying marks."""

from typing import Any, Union

import jax
import jax.numpy as jnp

AxisName = Union[None, str, tuple[str, ...]]


def check_axis_name(axis_name: Any) -> None:
  """Raises a ``TypeError`` unless ``axis_name`` is None, a str or a tuple of str."""
  if axis_name is None or isinstance(axis_name, str):
    return
  if (
    isinstance(axis_name, tuple)
    and axis_name
    and all(isinstance(a, str) for a in axis_name)
  ):
    return
  raise TypeError(
    "axis_name must be None (global perturbation), the name of the mapped "
    "data axis (a str, as in jax.lax.pmean) or a non-empty tuple of such "
    f"names, got axis_name={axis_name!r} of type {type(axis_name).__name__}."
  )


def pmean_inexact(tree: Any, axis_name: AxisName) -> Any:
  """``tree`` averaged over ``axis_name`` (itself for ``None``)."""
  if axis_name is None:
    return tree
  return jax.tree.map(
    lambda x: (
      jax.lax.pmean(x, axis_name)
      if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
      else x  # Integer or float0 gradients are left alone.
    ),
    tree,
  )


def _varying_axes(x: Any) -> frozenset:
  """The mesh axes over which ``x`` varies inside ``jax.shard_map``.

  Empty outside ``shard_map``, under ``check_vma=False``, ``pmap`` and
  ``vmap``, which do not track it.
  """
  if hasattr(jax, "typeof"):
    aval = jax.typeof(x)
  else:  # jax < 0.6.
    aval = jax.core.get_aval(x)  # type: ignore[attr-defined]
  manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10.
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", ()))  # jax 0.6 to 0.9.


def _to_varying(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """Marks ``x`` as varying over ``axes`` (a no-op on the values)."""
  missing = tuple(a for a in axes if a not in _varying_axes(x))
  if not missing:
    return x
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(x, missing, to="varying")
  return jax.lax.pvary(x, missing)  # type: ignore[attr-defined]  # jax < 0.8.


def vary_like(tree: Any, grads: Any, axis_name: AxisName) -> Any:
  """``tree`` marked as varying over ``axis_name`` where ``grads`` vary.

  Inside ``jax.shard_map`` (``check_vma=True``), the gradient with respect to
  weights that do not vary over the axis comes back summed over it; weights
  marked as varying give each device its own gradient.

  Args:
    tree: the weights to hand to a gradient function.
    grads: this device's gradients.
    axis_name: the mapped data axis, or ``None`` (``tree`` is returned).

  Returns:
    ``tree``, every leaf marked as varying when any leaf of ``grads`` varies.
  """
  if axis_name is None or not any(map(_varying_axes, jax.tree.leaves(grads))):
    return tree
  axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  return jax.tree.map(lambda w: _to_varying(w, axes), tree)
