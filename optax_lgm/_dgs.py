"""Dynamic Gradient Scaling (DGS), Mann 2024."""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_lgm import _common, _layers

_REDUCTIONS = ("global", "layer", "element")


class ScaleByDgsState(NamedTuple):
  """State of :func:`scale_by_dgs`.

  Attributes:
    count: number of finite steps seen (int32 scalar).
    importance: with ``importance_decay``, the EMA of ``|g|`` (a tree like the
      params, in ``stats_dtype``); otherwise ``None``.
  """

  count: jax.Array
  importance: Optional[optax.Updates]


def _gamma_leaves(gamma: Any, lay: _layers.Layering) -> list:
  """``gamma`` as one entry per flat leaf (a scalar is shared by all)."""
  if isinstance(gamma, (int, float)) or (hasattr(gamma, "ndim") and gamma.ndim == 0):
    return [gamma] * len(lay.leaf_layers)
  try:
    return lay.flatten(gamma)
  except (ValueError, TypeError) as e:
    raise ValueError(
      "gamma must be a scalar or a pytree with the structure of the params "
      f"({lay.treedef}), got gamma={gamma!r}."
    ) from e


def scale_by_dgs(
  beta: jax.typing.ArrayLike = 1.0,
  sigma: jax.typing.ArrayLike = 1e-8,
  gamma: Any = 1.0,
  *,
  reduction: str = "global",
  importance_decay: Optional[jax.typing.ArrayLike] = None,
  layers: _layers.Layers = "leaf",
  layer_axes: _layers.LayerAxes = None,
  mask: _layers.Mask = None,
  stats_dtype: Optional[jax.typing.DTypeLike] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Divides the gradient by a weighted L1 norm of the gradients.

  Dynamic Gradient Scaling's update of parameter :math:`i` is

  .. math::

    \tilde g_i = \frac{\beta\, g_i}{\sigma + \sum_{k \in K(i)} \gamma_k I_k},
    \qquad I_k = |g_k| ,

  where the importance :math:`I` is this step's ``|g|``, or with
  ``importance_decay=d`` its EMA :math:`I \leftarrow d I + (1 - d)|g|`
  (seeded with the first step's ``|g|``). The set :math:`K(i)` is chosen by
  ``reduction``:

  * ``"global"`` (the paper's equation): every parameter of the model, so one
    scalar divides the whole tree and the direction of the gradient is kept.
    The update is :math:`\beta g / \|g\|_1`, tiny for a large model: with
    plain SGD start from a learning rate of about :math:`0.5\sqrt{n}`
    (``n`` the number of parameters); 100 trains the 38k-parameter digits CNN
    of ``benchmarks/lgm_defaults.py`` to 96% in three epochs.
  * ``"layer"``: the parameters of :math:`i`'s layer (see ``layers``); each
    layer's update has an L1 norm of :math:`\beta`. About 1 for layers of
    hundreds to thousands of entries (87% on the same task and budget, where
    0.3 and 3 do worse and 10 diverges).
  * ``"element"``: just :math:`\gamma_i I_i`, which is what the paper's code
    listing does (``1 / (|g| + eps)``): sign descent in disguise. Use the
    learning rate of sign descent, about ``1e-2`` to ``1e-3`` (``1e-2``:
    97.5% on the same task and budget).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_lgm
    >>> params = {'w': jnp.array([1.0, 2.0]), 'b': jnp.array([0.5, 0.5])}
    >>> tx = optax_lgm.scale_by_dgs()
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.array([3.0, -1.0]), 'b': jnp.array([2.0, 2.0])}
    >>> updates, state = tx.update(grads, state)
    >>> updates['w']  # 3 / 8, -1 / 8
    Array([ 0.375, -0.125], dtype=float32)

  Args:
    beta: the overall scale :math:`\beta`.
    sigma: the stabiliser :math:`\sigma` added to the denominator.
    gamma: per-parameter importance weights :math:`\gamma`: a scalar, or a
      pytree shaped like the params whose leaves broadcast to the params'.
    reduction: ``"global"``, ``"layer"`` or ``"element"``.
    importance_decay: ``None`` (use this step's ``|g|``) or the decay of an
      EMA of ``|g|``, in ``[0, 1)``.
    layers: what a layer is, for ``reduction="layer"``: ``"leaf"``,
      ``"module"`` or a callable ``(path, leaf) -> label``.
    layer_axes: leading axes of a leaf that index separate (stacked) layers.
    mask: a pytree of booleans or a callable returning one; leaves where it is
      ``False`` pass through unchanged and do not count in the sums.
    stats_dtype: the dtype of the sums and of the importance EMA (``None``:
      float32).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`. On a step whose gradient
    is not finite, the state is left as it was (the updates are then not
    finite either, which :func:`optax.apply_if_finite` detects and skips).

  References:
    Mann, `Dynamic Gradient Scaling: A Fine-Grained Approach to Optimizing
    Large Language Models in Deep Learning <https://doi.org/10.22214/ijraset.2024.62669>`_,
    2024.
  """
  _common.check_choice("reduction", reduction, _REDUCTIONS)
  _common.check_number("sigma", sigma, lower=0.0)
  _common.check_number("importance_decay", importance_decay, lower=0.0, upper=1.0)
  if isinstance(importance_decay, (int, float)) and importance_decay == 1.0:
    raise ValueError(
      "importance_decay must lie in [0, 1), got importance_decay=1.0 "
      "(the importance would never leave zero)."
    )
  _layers.check_layers(layers)
  _layers.check_layer_axes(layer_axes)
  stats_dtype = jnp.float32 if stats_dtype is None else stats_dtype

  def layering(tree: Any) -> _layers.Layering:
    return _layers.make_layering(tree, layers, layer_axes=layer_axes, mask=mask)

  def init_fn(params: optax.Params) -> ScaleByDgsState:
    _gamma_leaves(gamma, layering(params))
    importance = None
    if importance_decay is not None:
      importance = optax.tree.zeros_like(params, dtype=stats_dtype)
    return ScaleByDgsState(count=jnp.zeros([], jnp.int32), importance=importance)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    lay = layering(updates)
    gammas = lay.unflatten(_gamma_leaves(gamma, lay))

    abs_g = lay.map(lambda g: jnp.abs(g.astype(stats_dtype)), updates)
    per_layer = lay.reduce(lambda a: a, abs_g, dtype=stats_dtype)
    finite = jnp.all(jnp.isfinite(per_layer))
    importance = state.importance
    if importance_decay is not None:
      first = state.count == 0
      importance = lay.map(
        lambda a, i: jnp.where(
          first, a, importance_decay * i + (1 - importance_decay) * a
        ),
        abs_g,
        state.importance,
      )
    weighted = lay.map(
      lambda i, w: i * jnp.asarray(w, stats_dtype),
      abs_g if importance is None else importance,
      gammas,
    )

    if reduction == "element":
      new_updates = lay.map(
        lambda g, w: (beta * g.astype(stats_dtype) / (sigma + w)).astype(g.dtype),
        updates,
        weighted,
      )
    else:
      sums = lay.reduce(lambda w: w, weighted, dtype=stats_dtype)

      def scale(g, d):
        return (beta * g.astype(stats_dtype) / (sigma + d)).astype(g.dtype)

      if reduction == "global":
        total = jnp.sum(sums)
        new_updates = lay.map(lambda g: scale(g, total), updates)
      else:
        new_updates = lay.map(scale, updates, per_layer=[sums])

    count = jnp.where(finite, optax.safe_increment(state.count), state.count)
    if importance is not None:
      importance = optax.tree.where(finite, importance, state.importance)
    return new_updates, ScaleByDgsState(count=count, importance=importance)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dgs(
  learning_rate: optax.ScalarOrSchedule,
  beta: jax.typing.ArrayLike = 1.0,
  sigma: jax.typing.ArrayLike = 1e-8,
  gamma: Any = 1.0,
  *,
  reduction: str = "global",
  importance_decay: Optional[jax.typing.ArrayLike] = None,
  momentum: Optional[jax.typing.ArrayLike] = None,
  nesterov: bool = False,
  weight_decay: jax.typing.ArrayLike = 0.0,
  layers: _layers.Layers = "leaf",
  layer_axes: _layers.LayerAxes = None,
  mask: _layers.Mask = None,
  weight_decay_mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SGD on dynamically scaled gradients: :func:`scale_by_dgs`, then SGD.

  The chain :func:`scale_by_dgs` → weight decay → (momentum) → learning rate.
  The learning rate depends strongly on ``reduction``; see
  :func:`scale_by_dgs` for a working value of each.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_lgm
    >>> def f(x): return jnp.sum(x ** 2)
    >>> params = jnp.array([1.0, 2.0, 3.0])
    >>> solver = optax_lgm.dgs(learning_rate=0.3, momentum=0.5)
    >>> state = solver.init(params)
    >>> for _ in range(100):
    ...   updates, state = solver.update(jax.grad(f)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(f(params) < 1e-2)
    True

  Args:
    learning_rate: a fixed learning rate or a schedule.
    beta: see :func:`scale_by_dgs`.
    sigma: see :func:`scale_by_dgs`.
    gamma: see :func:`scale_by_dgs`.
    reduction: see :func:`scale_by_dgs`.
    importance_decay: see :func:`scale_by_dgs`.
    momentum: the momentum decay (``None``: plain SGD, as in the paper).
    nesterov: whether to use Nesterov momentum.
    weight_decay: the weight decay coefficient (needs ``params`` in
      ``update``).
    layers: see :func:`scale_by_dgs`.
    layer_axes: see :func:`scale_by_dgs`.
    mask: see :func:`scale_by_dgs`.
    weight_decay_mask: which leaves are decayed, as in
      :func:`optax.add_decayed_weights`.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  References:
    Mann, `Dynamic Gradient Scaling: A Fine-Grained Approach to Optimizing
    Large Language Models in Deep Learning <https://doi.org/10.22214/ijraset.2024.62669>`_,
    2024.
  """
  return optax.chain(
    scale_by_dgs(
      beta,
      sigma,
      gamma,
      reduction=reduction,
      importance_decay=importance_decay,
      layers=layers,
      layer_axes=layer_axes,
      mask=mask,
    ),
    _common.sgd_tail(
      learning_rate, momentum, nesterov, weight_decay, weight_decay_mask
    ),
  )
