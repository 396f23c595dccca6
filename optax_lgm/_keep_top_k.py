"""Keep the gradient of the top-k layers: the selection step of layer-SAM."""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_lgm import _layers, _reductions, _selection, _sharding, _state_names


class KeepTopKLayersState(NamedTuple):
  """State of :func:`keep_top_k_layers`.

  Attributes:
    grad_norm: each layer's gradient norm at the last finite step, float32,
      shape ``[num_layers]``.
    selected: 1 for the layers kept at the last finite step, else 0, int32.
    selected_count: how many steps each layer has been kept, int32.
    names: the layer names (static).
  """

  grad_norm: jax.Array
  selected: jax.Array
  selected_count: jax.Array
  names: _state_names.LayerNames

  def diagnostics(self) -> dict[str, jax.Array]:
    """Per-layer arrays to log, by statistic name."""
    return _state_names.prefixed(
      self, "top_k_", ("grad_norm", "selected", "selected_count")
    )


def keep_top_k_layers(
  k: Optional[int],
  *,
  layers: _layers.Layers = "module",
  layer_axes: _layers.LayerAxes = None,
  mask: _layers.Mask = None,
  axis_name: _sharding.AxisName = None,
) -> optax.GradientTransformation:
  r"""Keeps the gradient of the ``k`` layers with the largest norms; zeros the rest.

  .. math::

    S = \operatorname{top-}k_l\ \lVert g_l \rVert_2, \qquad
    \tilde g_l = g_l \ \text{for}\ l \in S, \qquad \tilde g_l = 0 \ \text{otherwise}.

  This is the selection step of :func:`layer_sam` alone. Placed in front of
  SAM's adversarial optimizer, it perturbs only the selected layers, and is
  then equal to ``layer_sam(optimizer, rho, k, normalize="selected",
  unselected="recompute")`` (dynamic mode: no compute is saved)::

    optax.contrib.sam(
        optimizer,
        optax.chain(optax_lgm.keep_top_k_layers(k), optax.contrib.normalize(),
                    optax.sgd(rho)),
        opaque_mode=True)

  ``optax.contrib.sam`` re-initialises the adversarial optimizer's state
  after every step unless ``reset_state=False``; pass it to keep this
  transformation's diagnostics. Leaves that carry no statistic (size-1 and
  non-float leaves, those outside ``mask``) are never selected and come out as
  zeros; ``None`` stays ``None``. On a non-finite gradient the state is left
  as it was.

  With ``axis_name`` (inside ``jax.shard_map``, ``pmap`` or ``vmap``, each
  device holding the gradient of its own shard of the batch, as for
  m-sharpness), the layer norms, and so the selection and the state, are
  those of the gradient averaged over ``axis_name``: every device keeps the
  same layers, and the state is the same everywhere. The kept values are the
  device's own. Averaging costs one all-reduce of the gradient.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_lgm
    >>> grads = {'a': jnp.array([3.0, 4.0]), 'b': jnp.array([0.1, 0.1]),
    ...          'c': jnp.array([1.0, 1.0])}
    >>> tx = optax_lgm.keep_top_k_layers(2)
    >>> updates, state = tx.update(grads, tx.init(grads))
    >>> {name: update.tolist() for name, update in updates.items()}
    {'a': [3.0, 4.0], 'b': [0.0, 0.0], 'c': [1.0, 1.0]}

  Args:
    k: how many layers to keep; ``None`` for every layer.
    layers: what a layer is: ``"leaf"``, ``"module"`` or a callable
      ``(path, leaf) -> label``.
    layer_axes: leading axes of a leaf that index separate (stacked) layers.
    mask: a pytree of booleans or a callable returning one; leaves where it
      is ``False`` are never selected.
    axis_name: ``None`` (the default: select by the norms of the gradient
      given), or the name (or tuple of names) of the mapped axis over which
      the gradient is averaged before its norms are taken.

  Returns:
    A :class:`optax.GradientTransformation`.

  Raises:
    ValueError: for ``k < 1`` or ``k`` larger than the number of layers.
    TypeError: for an ``axis_name`` that is not ``None``, a str or a tuple
      of str.

  References:
    Lee et al., `Layer-wise Adaptive Gradient Norm Penalizing Method for
    Efficient and Accurate Deep Learning <https://arxiv.org/abs/2503.14205>`_,
    2024.
  """
  _selection.check_k(k)
  _sharding.check_axis_name(axis_name)
  spec = _layers.LayerSpec(layers, layer_axes, mask)

  def init_fn(params: optax.Params) -> KeepTopKLayersState:
    lay = spec(params)
    _selection.check_k_fits(k, lay.num_layers)
    n = lay.num_layers
    return KeepTopKLayersState(
      grad_norm=jnp.zeros([n], jnp.float32),
      selected=jnp.zeros([n], jnp.int32),
      selected_count=jnp.zeros([n], jnp.int32),
      names=_state_names.state_names(params, lay),
    )

  def update_fn(updates, state, params=None):
    del params
    lay = spec(updates)
    _state_names.check_names(lay, state.names, updates)
    _selection.check_k_fits(k, lay.num_layers)
    gbar = _sharding.pmean_inexact(updates, axis_name)
    norms = jnp.sqrt(_reductions.sums(lay, jnp.square, gbar, dtype=jnp.float32))
    sel = _selection.top_k(norms, k)
    kept = lay.map(
      lambda g, take: jnp.where(take, g, jnp.zeros_like(g)),
      updates,
      per_layer=[sel],
      missing=jnp.zeros_like,
    )
    new_state = KeepTopKLayersState(
      grad_norm=norms,
      selected=sel.astype(jnp.int32),
      selected_count=jnp.where(
        sel, optax.safe_increment(state.selected_count), state.selected_count
      ),
      names=state.names,
    )
    finite = jnp.isfinite(jnp.sum(norms))
    return kept, optax.tree.where(finite, new_state, state)

  return optax.GradientTransformation(init_fn, update_fn)
