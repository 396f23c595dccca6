"""Argument checks and pieces shared by every transformation.

Numeric hyperparameters may be arrays or tracers (``optax.inject_hyperparams``),
so they are checked only when given as plain Python numbers.
"""

import inspect
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax


def check_number(
  name: str,
  value: Any,
  *,
  lower: float | None = None,
  upper: float | None = None,
  lower_open: bool = False,
) -> None:
  """Raises a ``ValueError`` if a Python number lies outside a range.

  Args:
    name: the argument's name, for the message.
    value: the value given; arrays, tracers and schedules are not checked.
    lower: the smallest allowed value (``None``: no bound).
    upper: the largest allowed value (``None``: no bound).
    lower_open: whether ``lower`` itself is excluded.
  """
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return
  too_low = lower is not None and (value <= lower if lower_open else value < lower)
  too_high = upper is not None and value > upper
  if too_low or too_high or value != value:  # value != value: NaN.
    lo = "-inf" if lower is None else f"{lower}"
    hi = "inf" if upper is None else f"{upper}"
    bracket = "(" if lower_open else "["
    raise ValueError(f"{name} must lie in {bracket}{lo}, {hi}], got {name}={value!r}.")


def check_choice(name: str, value: Any, choices: tuple) -> None:
  """Raises a ``ValueError`` unless ``value`` is one of ``choices``."""
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {name}={value!r}.")


def check_float_dtype(name: str, dtype: Any) -> None:
  """Raises a ``TypeError`` unless ``dtype`` is ``None`` or a float dtype."""
  if dtype is None:
    return
  try:
    is_float = jnp.issubdtype(dtype, jnp.floating)
  except TypeError:
    is_float = False
  if not is_float:
    raise TypeError(
      f"{name} must be a floating-point dtype (e.g. jnp.float32), got {name}={dtype!r}."
    )


def check_order(low_name: str, low: Any, high_name: str, high: Any) -> None:
  """Raises a ``ValueError`` if two Python numbers are in the wrong order."""
  numbers = (int, float)
  if isinstance(low, numbers) and isinstance(high, numbers) and low > high:
    raise ValueError(
      f"{low_name} must not exceed {high_name}, got {low_name}={low!r} and "
      f"{high_name}={high!r}."
    )


def check_optimizer(name: str, optimizer: Any) -> None:
  """Raises a ``TypeError`` unless ``optimizer`` is a gradient transformation.

  Names the likely slip: the factory (``optax.sgd``) or a learning rate
  given where the transformation (``optax.sgd(0.05)``) belongs.
  """
  if isinstance(optimizer, optax.GradientTransformation) or (
    hasattr(optimizer, "init") and hasattr(optimizer, "update")
  ):
    return
  example = "optax.sgd(0.05, momentum=0.9)"
  if callable(optimizer):
    factory = getattr(optimizer, "__qualname__", repr(optimizer))
    slip = (
      f"the function {factory} itself: call it, e.g. {example} "
      "(optax.sgd(lr), not optax.sgd)"
    )
  else:
    slip = (
      f"{name}={optimizer!r}: the learning rate goes inside the optimizer, "
      f"e.g. optax.sgd({optimizer!r}, momentum=0.9)"
    )
  raise TypeError(
    f"{name} must be an optax.GradientTransformation such as {example}, got {slip}."
  )


def check_grad_fn(grad_fn: Any) -> None:
  """Raises a ``TypeError`` unless ``grad_fn`` can be called as ``(params, i)``.

  The signature is that of :func:`optax.contrib.sam`'s opaque mode:
  ``grad_fn(params, i) -> grads``. Callables without a signature that
  :mod:`inspect` can read are not checked.
  """
  expected = (
    "grad_fn must be a function grad_fn(params, i) -> grads (optax.contrib.sam's "
    "opaque-mode signature; e.g. jax.grad(lambda p, _: loss(p, batch)))"
  )
  if not callable(grad_fn):
    raise TypeError(f"{expected}, got grad_fn={grad_fn!r}.")
  try:
    signature = inspect.signature(grad_fn)
  except (TypeError, ValueError):
    return
  try:
    signature.bind(None, 0)
  except TypeError as e:
    name = getattr(grad_fn, "__name__", type(grad_fn).__name__)
    raise TypeError(
      f"{expected}, got {name}{signature}, which cannot be called as "
      f"grad_fn(params, i): {e}."
    ) from None


def add_decayed_weights(
  weight_decay: jax.typing.ArrayLike, mask: Any
) -> optax.GradientTransformation:
  """:func:`optax.add_decayed_weights` that needs no ``params`` for a literal 0.

  The state is that of :func:`optax.add_decayed_weights` whatever the value,
  so the optimizer's state has one structure whether ``weight_decay`` is a
  number or injected with :func:`optax.inject_hyperparams`.
  """
  decay = optax.add_decayed_weights(weight_decay, mask)
  if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
    return decay

  def update_fn(updates, state, params=None):
    if params is None:
      return updates, state
    return decay.update(updates, state, params)

  return optax.GradientTransformation(decay.init, update_fn)


def sgd_tail(
  learning_rate: optax.ScalarOrSchedule,
  momentum: Optional[jax.typing.ArrayLike],
  nesterov: bool,
  weight_decay: jax.typing.ArrayLike,
  weight_decay_mask: Any,
) -> optax.GradientTransformationExtraArgs:
  """Weight decay → momentum → learning rate, shared by the ready optimizers."""
  if not callable(learning_rate):
    check_number("learning_rate", learning_rate, lower=0.0)
  check_number("weight_decay", weight_decay, lower=0.0)
  check_number("momentum", momentum, lower=0.0, upper=1.0)
  parts = [add_decayed_weights(weight_decay, weight_decay_mask)]
  if momentum is not None:
    parts.append(optax.trace(decay=momentum, nesterov=nesterov))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)
