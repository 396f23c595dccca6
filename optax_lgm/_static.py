"""Static mode of partial-layer SAM without a hand-written host loop.

:class:`StaticSelection` wraps a training step that takes ``selection=`` (a
static argument of ``jax.jit`` or ``nnx.jit``) and passes it to
:func:`~optax_lgm.layer_sam`'s ``update``. It runs the first step in dynamic
mode, re-selects from the optimizer state on a fixed schedule, switches only
when the new selection is clearly better, and never compiles more than a
stated number of steps.
"""

from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import numpy as np

from optax_lgm import _common
from optax_lgm._layer_sam import LayerSamState, find_layer_sam_state, select_layers

Selection = Optional[tuple[int, ...]]


def _find_layer_sam_state(tree: Any) -> Optional[LayerSamState]:
  """The first :class:`LayerSamState` in ``tree``, or ``None``.

  Looks into the ``opt_state`` of an ``nnx.Optimizer`` (at the top or among
  the leaves) as well as into the pytree itself.
  """
  opt_state = getattr(tree, "opt_state", None)  # An nnx.Optimizer.
  if opt_state is not None and (found := find_layer_sam_state(opt_state)) is not None:
    return found
  try:
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, LayerSamState))
  except TypeError:  # Objects that are not pytrees hold no state.
    return None
  for leaf in leaves:
    if isinstance(leaf, LayerSamState):
      return leaf
    if getattr(leaf, "opt_state", None) is not None:
      if (found := find_layer_sam_state(leaf.opt_state)) is not None:
        return found
  return None


class StaticSelection:
  r"""Runs a :func:`~optax_lgm.layer_sam` training step in static mode.

  Static mode is where partial-layer SAM saves compute: with the selection
  fixed at trace time, XLA drops the second-pass work of the layers that are
  not perturbed. This helper turns a step that takes ``selection=`` into a
  callable that manages the selection on the host:

  * **Step 0** runs in dynamic mode (``selection=None``): the top-:math:`k`
    layers are chosen in the graph, and the state records every layer's
    gradient norm.
  * **Re-selection.** Before step :math:`t = 1` (or, if no step has been
    finite yet, as ``optax.apply_if_finite`` skips non-finite ones, before
    the step after the first finite one) and before every step :math:`t`
    that is a multiple of ``every``, the running norms :math:`a_l`
    of the state (``grad_norm_avg``, see :func:`~optax_lgm.select_layers`)
    give the candidate :math:`T`, the :math:`k` layers with the largest
    :math:`a_l`. A selection :math:`S` is scored by the squared gradient norm
    it holds, :math:`s(S) = \sum_{l \in S} a_l^2`. The step switches from the
    current selection :math:`C` to :math:`T` only if

    .. math::
      s(T) > (1 + m)\, s(C),

    with :math:`m` = ``margin``, so near-ties do not flip the selection (at
    :math:`t = 1` the dynamic mode is always left). A change takes effect at
    the step at which it is decided, and is logged in :attr:`changes`.
  * **Bounded compilation.** ``jit`` compiles one step per distinct
    selection (dynamic mode counts as one). Once ``max_compilations``
    distinct selections have run, a candidate that has not run before is
    replaced by the best already-compiled static selection
    :math:`T' = \arg\max_{S \text{ compiled}} s(S)`, and the same rule
    applies to :math:`T'`. So a run compiles at most ``max_compilations``
    steps, whatever its length: the cache of compiled selections is the
    ``jit``'s own, bounded by this rule.

  The state is found after each re-selection step in what the step returned
  (a functional ``(params, opt_state)`` loop) or else in its arguments (an
  ``nnx.Optimizer``, updated in place); ``state_fn`` overrides that search.
  Reading the norms moves ``num_layers`` floats to the host every ``every``
  steps.

  Examples:
    With Flax NNX, the training step and the loop::

      optimizer = nnx.Optimizer(model, optax_lgm.layer_sam(tx, k=2), wrt=nnx.Param)

      @nnx.jit(static_argnames='selection')
      def train_step(model, optimizer, x, y, selection=None):
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)
        rest = nnx.as_pure(rest)

        def grad_fn(params, _):  # Second pass: running statistics untouched.
          return jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest), x, y))(params)

        loss_value, grads = nnx.value_and_grad(loss)(model, x, y)
        optimizer.update(model, grads, grad_fn=grad_fn, selection=selection)
        return loss_value

      step = optax_lgm.StaticSelection(train_step, every=10)
      for x, y in batches:
        loss_value = step(model, optimizer, x, y)
      print(step.selection, step.compilations, step.changes)

    A functional loop with ``jax.jit``:

    >>> import functools
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_lgm
    >>> params = {'a': jnp.ones(3), 'b': jnp.ones(3), 'c': jnp.ones(3)}
    >>> def loss(p):
    ...   return jnp.sum(p['a'] ** 2) + 3 * jnp.sum(p['c'] ** 2)
    >>> tx = optax_lgm.layer_sam(optax.sgd(0.1), k=1)
    >>> @functools.partial(jax.jit, static_argnames='selection')
    ... def train_step(params, opt_state, selection=None):
    ...   grad_fn = jax.grad(lambda p, _: loss(p))
    ...   updates, opt_state = tx.update(
    ...       grad_fn(params, 0), opt_state, params, grad_fn=grad_fn,
    ...       selection=selection)
    ...   return optax.apply_updates(params, updates), opt_state
    >>> step = optax_lgm.StaticSelection(train_step, every=5)
    >>> opt_state = tx.init(params)
    >>> for _ in range(12):
    ...   params, opt_state = step(params, opt_state)
    >>> step.selection, step.compilations, step.changes
    ((2,), 2, [(1, (2,))])

  Args:
    step_fn: the training step; it takes ``selection`` as a keyword argument
      (static under ``jit``) and hands it to ``layer_sam``'s ``update``.
    every: re-select before every step whose index is a multiple of
      ``every`` (and before step 1).
    margin: :math:`m` in the switching rule, ``>= 0``; ``0`` switches to any
      strictly better candidate.
    max_compilations: the most distinct selections (dynamic mode included)
      the run may use, ``>= 2``.
    k: how many layers to select; ``None`` keeps as many as ``layer_sam``
      perturbed at step 0 (its own ``k``).
    by: what ranks the layers: ``"average"`` (the running average of the
      norms) or ``"last"`` (the last step's norms).
    state_fn: optional ``(outputs, args, kwargs) -> opt_state``, where to
      find the ``layer_sam`` state after a step.

  Attributes:
    selection: the selection the next step runs with: ``None`` (dynamic mode)
      or a sorted tuple of layer indices.
    step: how many steps have run.
    changes: ``(step, selection)`` for every change of selection, the step
      being the first that ran with the new selection.
  """

  def __init__(
    self,
    step_fn: Callable[..., Any],
    *,
    every: int = 10,
    margin: float = 0.05,
    max_compilations: int = 4,
    k: Optional[int] = None,
    by: str = "average",
    state_fn: Optional[Callable[[Any, tuple, dict], Any]] = None,
  ):
    if not callable(step_fn):
      raise TypeError(f"step_fn must be callable, got step_fn={step_fn!r}.")
    for name, value, lower in (
      ("every", every, 1),
      ("max_compilations", max_compilations, 2),
    ):
      if isinstance(value, bool) or not isinstance(value, int) or value < lower:
        raise ValueError(f"{name} must be an int >= {lower}, got {name}={value!r}.")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
      raise TypeError(f"margin must be a number, got margin={margin!r}.")
    _common.check_number("margin", margin, lower=0.0)
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
      raise ValueError(f"k must be None or an int >= 1, got k={k!r}.")
    _common.check_choice("by", by, ("average", "last"))
    self.step_fn = step_fn
    self.every = every
    self.margin = float(margin)
    self.max_compilations = max_compilations
    self.k = k
    self.by = by
    self.state_fn = state_fn
    self.selection: Selection = None
    self.step = 0
    self.changes: list[tuple[int, Selection]] = []
    self._used: list[Selection] = []  # Distinct selections run, in order.

  @property
  def compilations(self) -> int:
    """How many distinct selections (dynamic mode included) have run."""
    return len(self._used)

  @property
  def selections(self) -> tuple[Selection, ...]:
    """The distinct selections run so far, in the order they first ran."""
    return tuple(self._used)

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    """Runs one step with the current selection and re-selects if due."""
    if "selection" in kwargs:
      raise TypeError(
        "StaticSelection passes selection= itself; call it without "
        f"selection (got selection={kwargs['selection']!r})."
      )
    if self.selection not in self._used:
      self._used.append(self.selection)
    outputs = self.step_fn(*args, selection=self.selection, **kwargs)
    self.step += 1
    if self.selection is None or self.step % self.every == 0:
      self._reselect(outputs, args, kwargs)
    return outputs

  def _state(self, outputs: Any, args: tuple, kwargs: dict) -> LayerSamState:
    if self.state_fn is not None:
      state = _find_layer_sam_state(self.state_fn(outputs, args, kwargs))
    else:
      state = _find_layer_sam_state(outputs)
      if state is None:
        state = _find_layer_sam_state((args, kwargs))
    if state is None:
      raise ValueError(
        "StaticSelection found no LayerSamState (from optax_lgm.layer_sam) in "
        "the step's outputs or arguments; return the optimizer state from the "
        "step, pass the nnx.Optimizer as an argument, or give state_fn=."
      )
    return state

  def _reselect(self, outputs: Any, args: tuple, kwargs: dict) -> None:
    state = self._state(outputs, args, kwargs)
    norms = np.asarray(
      jax.device_get(state.grad_norm_avg if self.by == "average" else state.grad_norm),
      dtype=np.float64,
    )
    if not np.any(norms > 0):
      # No finite step yet (the first was skipped, e.g. by apply_if_finite):
      # stay in dynamic mode and try again after the next step.
      return
    candidate = select_layers(state, self.k, by=self.by)
    if candidate not in self._used and len(self._used) >= self.max_compilations:
      compiled = [s for s in self._used if s is not None]
      candidate = max(compiled, key=lambda s: self.score(s, norms))
    if candidate == self.selection:
      return
    if self.selection is None or self.score(candidate, norms) > (
      1.0 + self.margin
    ) * self.score(self.selection, norms):
      self.selection = candidate
      self.changes.append((self.step, candidate))

  @staticmethod
  def score(selection: Sequence[int], norms: np.ndarray) -> float:
    r""":math:`s(S) = \sum_{l \in S} a_l^2`, the squared norm ``selection`` holds."""
    return float(np.sum(np.square(norms[list(selection)])))

  def state_dict(self) -> dict[str, Any]:
    """The host state, as JSON-serialisable Python values (for checkpoints)."""

    def to_list(selection: Selection) -> Optional[list[int]]:
      return None if selection is None else list(selection)

    return {
      "step": self.step,
      "selection": to_list(self.selection),
      "selections": [to_list(s) for s in self._used],
      "changes": [[step, to_list(s)] for step, s in self.changes],
    }

  def load_state_dict(self, state: dict[str, Any]) -> None:
    """Restores what :meth:`state_dict` returned, so a resumed run continues.

    Selections that ran before the restore count towards
    ``max_compilations``; each is compiled again in this process the first
    time it runs.
    """

    def to_tuple(selection: Optional[Sequence[int]]) -> Selection:
      return None if selection is None else tuple(int(i) for i in selection)

    self.step = int(state["step"])
    self.selection = to_tuple(state["selection"])
    self._used = [to_tuple(s) for s in state["selections"]]
    self.changes = [(int(step), to_tuple(s)) for step, s in state["changes"]]

  def log(self) -> dict[str, Any]:
    """What to record in a run's metrics: compilations and selection changes."""
    state = self.state_dict()
    return {
      "compilations": self.compilations,
      "selection": state["selection"],
      "selection_changes": state["changes"],
    }
