"""Per-layer reductions of a pytree: sums and moments, one pass over each leaf.

Each leaf is reduced to one value per slice (:attr:`Layering.leaf_layers`),
then the slices of a layer are merged with one ``segment_sum`` where several
leaves or slices share a layer. No Python loop runs at step time: the loops
below run once, at trace time.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_lgm._layers import Layering


def sums(
  lay: Layering,
  fn: Callable[[jax.Array], jax.Array],
  tree: Any,
  *,
  dtype: jax.typing.DTypeLike = jnp.float32,
) -> jax.Array:
  """Returns ``sum(fn(leaf))`` over the elements of each layer.

  Args:
    lay: the :class:`Layering` of ``tree``.
    fn: an elementwise function applied to each leaf, cast to ``dtype``.
    tree: a tree with the structure of the layering.
    dtype: the dtype of the statistics.

  Returns:
    An array of shape ``[num_layers]`` and dtype ``dtype``.
  """
  parts = []
  for x, ids in zip(lay.flatten(tree), lay.leaf_layers):
    if ids is None:
      continue
    axes = tuple(range(ids.ndim, jnp.ndim(x)))
    parts.append(jnp.sum(fn(jnp.asarray(x).astype(dtype)), axis=axes).reshape(-1))
  if not parts:
    return jnp.zeros([lay.num_layers], dtype)
  flat = jnp.concatenate(parts)
  seg = lay.segment_ids()
  if np.array_equal(seg, np.arange(lay.num_layers)):
    return flat
  return jax.ops.segment_sum(
    flat, jnp.asarray(seg), num_segments=lay.num_layers, indices_are_sorted=False
  )


def moments(
  lay: Layering, tree: Any, *, dtype: jax.typing.DTypeLike = jnp.float32
) -> tuple[jax.Array, jax.Array]:
  """Population mean and variance of each layer's entries, in one pass.

  Each slice is shifted by its first entry before its sum and sum of squares
  are taken (so a constant layer has a variance of exactly zero and a large
  mean does not cancel the variance away), then the slices of a layer are
  merged with Chan's parallel formula.

  Args:
    lay: the :class:`Layering` of ``tree``.
    tree: a tree with the structure of the layering.
    dtype: the dtype of the statistics.

  Returns:
    ``(mean, var)``, each of shape ``[num_layers]``.
  """
  shifts, s1s, s2s, counts = [], [], [], []
  for x, ids in zip(lay.flatten(tree), lay.leaf_layers):
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
    zeros = jnp.zeros([lay.num_layers], dtype)
    return zeros, zeros
  # The arithmetic on the sums runs once on [num_slices] vectors, not once
  # per leaf: fewer, shared kernels (compile time on many-leaf trees).
  n_s = jnp.asarray(np.concatenate(counts), dtype)
  s1, s2 = jnp.concatenate(s1s), jnp.concatenate(s2s)
  mean_s = jnp.concatenate(shifts) + s1 / n_s
  m2_s = jnp.maximum(s2 - s1 * s1 / n_s, 0.0)
  seg = lay.segment_ids()
  sizes = jnp.asarray(lay.sizes, dtype)
  if np.array_equal(seg, np.arange(lay.num_layers)):
    return mean_s, m2_s / sizes
  seg_j = jnp.asarray(seg)
  mean = jax.ops.segment_sum(n_s * mean_s, seg_j, lay.num_layers) / sizes
  spread = n_s * jnp.square(mean_s - mean[seg_j])
  m2 = jax.ops.segment_sum(m2_s + spread, seg_j, lay.num_layers)
  return mean, m2 / sizes


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
