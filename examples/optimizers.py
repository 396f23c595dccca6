"""The optimizers of `examples.train`, by name.

The library's ``lgm``, ``dgs`` and ``layer_sam`` and, to compare with, ``sgd``,
``adam``, ``lars`` and ``optax.contrib.sam``. Under a schedule other than every
step, ``sam`` is ``layer_sam`` with every layer selected and
``unselected="recompute"``: ``optax.contrib.sam`` at every step that runs the
second pass (for models without size-1 leaves, as those of `examples.models`).
"""

import functools
from typing import Any

import optax

import optax_lgm
from examples.config import OPTIMIZERS, Config

DEFAULT_LEARNING_RATES = dict(
  sgd=0.05, adam=1e-3, lars=2.0, sam=0.05, lgm=0.05, dgs=3e-4, layer_sam=0.05
)
"""Learning rates checked to train the digits CNN above 90% in a few epochs."""

DEFAULT_RHOS = dict(sam=0.05, layer_sam=0.01)
"""The perturbation radii of ``sam`` and ``layer_sam`` when ``rho`` is left out.

``layer_sam`` puts the whole radius on its ``k`` layers (``normalize="selected"``),
so its radius is smaller than SAM's: at SAM's 0.05 its accuracy fell below
SAM's and SGD's on Fashion-MNIST (the results page, "Partial-layer SAM: time
to target through the trainer").
"""


def make_optimizer(
  name: str, learning_rate: float | None = None, layer_axes: Any = None, *,
  grad_accum: int = 1, skip_nonfinite: int = 0, sam_schedule: str = "every",
  sam_every: int = 1, sam_probability: float = 0.5, sam_skipped: str = "plain",
  total_steps: int | None = None, rho: float | None = None,
) -> optax.GradientTransformation:  # fmt: skip
  """Builds an optimizer of `OPTIMIZERS`; ``sam`` and ``layer_sam`` need ``grad_fn=``.

  The arguments are the `examples.config.Config` settings of the same names
  (``sam_*``: ``layer_sam``'s ``schedule``, ``every``, ``probability`` and
  ``skipped``), ``None`` the optimizer's default (`DEFAULT_LEARNING_RATES`,
  `DEFAULT_RHOS`); ``total_steps`` is the run over which ``"adaptive"``'s
  threshold rises from -1 to 1 (``None``: 0).
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer name={name!r}; expected one of {OPTIMIZERS}.")
  lr = DEFAULT_LEARNING_RATES[name] if learning_rate is None else learning_rate
  if name in ("lgm", "dgs"):
    tx = getattr(optax_lgm, name)(learning_rate=lr, layer_axes=layer_axes)
  elif name in ("adam", "lars"):
    tx = getattr(optax, name)(lr)
  else:  # sgd, and the base of sam and layer_sam.
    tx = optax.sgd(lr, momentum=0.9)
  if grad_accum != 1:
    tx = optax.MultiSteps(tx, grad_accum).gradient_transformation()
  rho = DEFAULT_RHOS.get(name) if rho is None else rho
  if name == "sam" and sam_schedule == "every" and sam_every == 1:
    adversary = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
    tx = optax.contrib.sam(tx, adversary, opaque_mode=True)
  elif name in ("sam", "layer_sam"):
    selection = dict(k=None, unselected="recompute") if name == "sam" else {}
    threshold = optax.linear_schedule(-1.0, 1.0, total_steps) if total_steps else 0.0
    tx = optax_lgm.layer_sam(
      tx, rho, layer_axes=layer_axes, schedule=sam_schedule, every=sam_every,
      probability=sam_probability, skipped=sam_skipped, threshold=threshold,
      **selection,
    )  # fmt: skip
  if skip_nonfinite:
    tx = optax.apply_if_finite(tx, max_consecutive_errors=skip_nonfinite)
  return tx


_cached_optimizer = functools.cache(make_optimizer)


def optimizer_of(config: Config, layer_axes: Any, total_steps: int):
  """`make_optimizer` of ``config``'s settings, the same object for the same ones.

  Runs that share it (seeds, a run and its resumption) share ``nnx.jit``'s
  compiled step.
  """
  names = ("grad_accum", "skip_nonfinite", "sam_schedule", "sam_every")
  names += ("sam_probability", "sam_skipped", "rho")
  return _cached_optimizer(
    config.optimizer, config.learning_rate, layer_axes, total_steps=total_steps,
    **{name: getattr(config, name) for name in names},
  )  # fmt: skip


class NonFiniteError(RuntimeError):
  """Too many steps in a row had a non-finite gradient."""


def nonfinite_steps(opt_state: Any) -> tuple[int, int]:
  """Steps skipped by ``apply_if_finite`` (``skip_nonfinite``): in a row, in all."""
  if not isinstance(opt_state, optax.ApplyIfFiniteState):
    return 0, 0
  return int(opt_state.notfinite_count[...]), int(opt_state.total_notfinite[...])
