"""Dynamic Gradient Scaling (DGS), Mann 2024."""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_lgm import _common, _layers, _reductions, _state_names

_REDUCTIONS = ("global", "layer", "element")
_DENOMINATORS = ("sum", "mean")


class ScaleByDgsState(NamedTuple):
  """State of :func:`scale_by_dgs`.

  Attributes:
    count: number of finite steps seen (int32 scalar).
    importance: with ``importance_decay``, the EMA of ``|g|`` (a tree like the
      params, in ``stats_dtype``); otherwise ``None``.
    names: the layer names and leaf shapes of the params given to ``init``
      (static), against which ``update`` checks the gradients.
  """

  count: jax.Array  # type: ignore[assignment]  # Shadows tuple.count, as in optax.
  importance: Optional[optax.Updates]
  names: _state_names.LayerNames = _state_names.LayerNames()


def _gamma_leaves(gamma: Any, lay: _layers.Layering) -> list:
  """``gamma`` as one entry per flat leaf (a scalar is shared by all)."""
  if isinstance(gamma, (int, float)) or (hasattr(gamma, "ndim") and gamma.ndim == 0):
    return [gamma] * len(lay.leaf_layers)
  # Not a scalar: a pytree like the params.
  leaves = _layers.flatten_like(lay.treedef, gamma, "gamma", "the params")
  for leaf in leaves:
    _check_gamma(leaf)
  return leaves


def _check_gamma(gamma: Any) -> None:
  """Raises a ``ValueError`` for a known negative ``gamma`` (gradient ascent)."""
  if gamma is None or isinstance(gamma, jax.core.Tracer):
    return
  if np.any(np.asarray(gamma) < 0):
    raise ValueError(
      "gamma must be non-negative (a negative weight turns the step into "
      f"gradient ascent), got gamma={gamma!r}."
    )


def scale_by_dgs(
  beta: jax.typing.ArrayLike = 1.0,
  sigma: jax.typing.ArrayLike = 1e-8,
  gamma: Any = 1.0,
  *,
  reduction: str = "global",
  denominator: str = "sum",
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
    The update is :math:`\beta g / \|g\|_1`: each entry shrinks as the
    number of parameters grows, so the learning rate that works depends on
    the model's size.
  * ``"layer"``: the parameters of :math:`i`'s layer (see ``layers``); each
    layer's update has an L1 norm of :math:`\beta`.
  * ``"element"``: just :math:`\gamma_i I_i`, which is what the paper's code
    listing does (``1 / (|g| + eps)``): sign descent in disguise, with the
    learning rate of sign descent.

  ``denominator="mean"`` divides by the mean :math:`\frac{1}{|K(i)|}
  \sum_{k \in K(i)} \gamma_k I_k` instead of the sum (``"sum"``, the
  equation): the update is then :math:`|K(i)|` times the equation's, with a
  mean magnitude of :math:`\beta` per entry whatever the size of the model
  or of the layer, so one learning rate serves every model and every
  reduction. :func:`dgs` uses it. Working learning rates are measured on the
  results page of the documentation.

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
    gamma: per-parameter importance weights :math:`\gamma \ge 0`: a scalar,
      or a pytree shaped like the params whose leaves broadcast to the
      params'.
    reduction: ``"global"``, ``"layer"`` or ``"element"``.
    denominator: ``"sum"`` (the equation) or ``"mean"`` (divided by the
      number of entries of :math:`K(i)`).
    importance_decay: ``None`` (use this step's ``|g|``) or the decay of an
      EMA of ``|g|``, in ``[0, 1)``.
    layers: what a layer is, for ``reduction="layer"``: ``"leaf"``,
      ``"module"`` or a callable ``(path, leaf) -> label``.
    layer_axes: leading axes of a leaf that index separate (stacked) layers.
    mask: a pytree of booleans or a callable returning one; leaves where it is
      ``False`` pass through unchanged and do not count in the sums.
    stats_dtype: a float dtype for the sums and the importance EMA (``None``:
      float32).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`. On a step whose gradient
    is not finite, the state is left as it was (the updates are then not
    finite either, which :func:`optax.apply_if_finite` detects and skips).

  Raises:
    ValueError: for an unknown ``reduction``, ``denominator`` or ``layers``,
      a negative ``sigma`` or ``gamma``, an ``importance_decay`` outside
      ``[0, 1)``, or (in ``update``) gradients not shaped like the params.
    TypeError: for a ``stats_dtype`` that is not a float dtype.

  References:
    Mann, `Dynamic Gradient Scaling: A Fine-Grained Approach to Optimizing
    Large Language Models in Deep Learning <https://doi.org/10.22214/ijraset.2024.62669>`_,
    2024.
  """
  _common.check_choice("reduction", reduction, _REDUCTIONS)
  _common.check_choice("denominator", denominator, _DENOMINATORS)
  _common.check_number("sigma", sigma, lower=0.0)
  _common.check_number("importance_decay", importance_decay, lower=0.0, upper=1.0)
  if isinstance(importance_decay, (int, float)) and importance_decay == 1.0:
    raise ValueError(
      "importance_decay must lie in [0, 1), got importance_decay=1.0 "
      "(the importance would never leave zero)."
    )
  if isinstance(gamma, (int, float)):
    _check_gamma(gamma)
  _common.check_float_dtype("stats_dtype", stats_dtype)
  spec = _layers.LayerSpec(layers, layer_axes, mask)
  stats_dtype = jnp.float32 if stats_dtype is None else stats_dtype

  def init_fn(params: optax.Params) -> ScaleByDgsState:
    lay = spec(params)
    if not _state_names.is_params_placeholder(params):
      _gamma_leaves(gamma, lay)
    importance = None
    if importance_decay is not None:
      importance = optax.tree.zeros_like(params, dtype=stats_dtype)
    names = _state_names.state_names(params, lay)
    return ScaleByDgsState(jnp.zeros([], jnp.int32), importance, names)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    lay = spec(updates)
    _state_names.check_names(lay, state.names, updates)
    abs_g = lay.map(lambda g: jnp.abs(g.astype(stats_dtype)), updates)
    finite = jnp.all(
      jnp.isfinite(_reductions.sums(lay, lambda a: a, abs_g, dtype=stats_dtype))
    )
    importance = _importance(lay, abs_g, state)
    gammas = lay.unflatten(_gamma_leaves(gamma, lay))
    weighted = lay.map(lambda i, w: i * jnp.asarray(w, stats_dtype), importance, gammas)
    new_updates = _divide(lay, updates, weighted)
    count = jnp.where(finite, optax.safe_increment(state.count), state.count)
    if importance_decay is not None:
      importance = optax.tree.where(finite, importance, state.importance)
    else:
      importance = None
    return new_updates, ScaleByDgsState(count, importance, state.names)

  def _importance(lay, abs_g, state):
    """This step's ``|g|``, or its EMA with ``importance_decay``."""
    if importance_decay is None:
      return abs_g
    lay.flatten_as(state.importance, "the state's importance")
    first = state.count == 0
    d = importance_decay
    return lay.map(
      lambda a, i: jnp.where(first, a, d * i + (1 - d) * a), abs_g, state.importance
    )

  def _divide(lay, updates, weighted):
    """``beta * g / (sigma + sum or mean of weighted over K(i))``."""

    def scale(g, d):
      return (beta * g.astype(stats_dtype) / (sigma + d)).astype(g.dtype)

    if reduction == "element":
      return lay.map(scale, updates, weighted)
    sums = _reductions.sums(lay, lambda w: w, weighted, dtype=stats_dtype)
    sizes = np.asarray(lay.sizes, np.float64)
    if reduction == "global":
      total = jnp.sum(sums)
      if denominator == "mean":
        total = total / max(float(np.sum(sizes)), 1.0)
      return lay.map(lambda g: scale(g, total), updates)
    if denominator == "mean":
      sums = sums / jnp.asarray(np.maximum(sizes, 1.0), stats_dtype)
    return lay.map(scale, updates, per_layer=[sums])

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dgs(
  learning_rate: optax.ScalarOrSchedule,
  momentum: Optional[jax.typing.ArrayLike] = 0.9,
  nesterov: bool = False,
  weight_decay: jax.typing.ArrayLike = 0.0,
  *,
  beta: jax.typing.ArrayLike = 1.0,
  sigma: jax.typing.ArrayLike = 1e-8,
  gamma: Any = 1.0,
  reduction: str = "global",
  denominator: str = "mean",
  importance_decay: Optional[jax.typing.ArrayLike] = None,
  layers: _layers.Layers = "leaf",
  layer_axes: _layers.LayerAxes = None,
  mask: _layers.Mask = None,
  weight_decay_mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SGD with momentum on dynamically scaled gradients.

  The chain :func:`scale_by_dgs` → weight decay → momentum → learning rate,
  with the positional arguments of :func:`lgm` and :func:`optax.sgd` and the
  defaults of :func:`lgm`:

  .. math::

    u_t = -\eta_t\, \mathrm{trace}_\mu\Big(
      \frac{\beta\, g_t}{\sigma + \operatorname{mean}_{k}\, \gamma_k |g_{t,k}|}
      + \lambda\, w_t\Big).

  It divides by the *mean* of :math:`\gamma |g|` (``denominator="mean"``),
  not by the sum of the paper's equation: the two differ by the constant
  factor :math:`n`, the number of parameters (of the model, for
  ``reduction="global"``; of each layer, for ``"layer"``). So
  ``dgs(lr, denominator="sum")`` is the equation, and ``dgs(lr)`` equals
  ``dgs(lr * n, denominator="sum")``; but with the mean, each entry's update
  has a mean magnitude of :math:`\beta` whatever the size of the model, and
  one learning rate trains models of very different sizes and serves every
  ``reduction``: start from ``learning_rate=3e-4``. The measurement is on
  the results page of the documentation ("DGS: one learning rate").

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_lgm
    >>> def f(x): return jnp.sum(x ** 2)
    >>> params = jnp.array([1.0, 2.0, 3.0])
    >>> solver = optax_lgm.dgs(learning_rate=0.01)
    >>> state = solver.init(params)
    >>> for _ in range(200):
    ...   updates, state = solver.update(jax.grad(f)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(f(params) < 1e-2)
    True

  Args:
    learning_rate: a fixed learning rate or a schedule.
    momentum: the momentum decay (``None``: plain SGD, as in the paper).
    nesterov: whether to use Nesterov momentum.
    weight_decay: the weight decay coefficient (needs ``params`` in
      ``update``).
    beta: see :func:`scale_by_dgs`.
    sigma: see :func:`scale_by_dgs`.
    gamma: see :func:`scale_by_dgs`.
    reduction: see :func:`scale_by_dgs`.
    denominator: see :func:`scale_by_dgs`; ``"sum"`` for the paper's
      equation (its learning rate then depends on the model's size).
    importance_decay: see :func:`scale_by_dgs`.
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
      denominator=denominator,
      importance_decay=importance_decay,
      layers=layers,
      layer_axes=layer_axes,
      mask=mask,
    ),
    _common.sgd_tail(
      learning_rate, momentum, nesterov, weight_decay, weight_decay_mask
    ),
  )
