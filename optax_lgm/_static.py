"""Static mode of partial-layer SAM without a hand-written host loop.

:class:`StaticSelection` wraps a training step that takes ``selection=`` (a
static argument of ``jax.jit`` or ``nnx.jit``) and passes it to
:func:`~optax_lgm.layer_sam`'s ``update``. It starts from a cheap selection
(or in dynamic mode), re-selects from the optimizer state on a fixed schedule,
compiles each new selection in a background thread while the current one
keeps training, and switches only when a change wins consistently and pays
for its compile.
"""

import concurrent.futures
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import numpy as np

from optax_lgm import _common, _selection
from optax_lgm._layer_sam import LayerSamState, find_layer_sam_state

Selection = Optional[tuple[int, ...]]
CompileFn = Callable[[Selection, tuple, dict], Any]

_UNMEASURED_SHARE = 0.5
"""The share of a background compile assumed to land on the critical path
before one has been measured (about what two CPU cores showed)."""


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


def _abstract(tree: Any) -> Any:
  """``tree`` with every array replaced by its shape, dtype and placement.

  Uncommitted arrays keep no sharding, so that the compiled step is the one a
  call with the concrete arrays looks up.
  """

  def leaf(x: Any) -> Any:
    if not isinstance(x, jax.Array):
      return x
    sharding = x.sharding if x.committed else None
    return jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=sharding, weak_type=x.aval.weak_type
    )

  return jax.tree.map(leaf, tree)


def aot_compile(step_fn: Callable[..., Any]) -> Optional[CompileFn]:
  """The default ``compile_fn``: ahead-of-time compilation through ``jit``.

  Returns ``None`` when ``step_fn`` is not a ``jax.jit`` or ``nnx.jit``
  function (it has no ``trace``/``lower``): such a step is compiled on its
  first call instead.
  """
  if hasattr(step_fn, "trace"):

    def compile_traced(selection: Selection, args: tuple, kwargs: dict) -> Any:
      return step_fn.trace(*args, selection=selection, **kwargs).lower().compile()

    return compile_traced
  if hasattr(step_fn, "lower"):

    def compile_lowered(selection: Selection, args: tuple, kwargs: dict) -> Any:
      return step_fn.lower(*args, selection=selection, **kwargs).compile()

    return compile_lowered
  return None


class StaticSelection:
  r"""Runs a :func:`~optax_lgm.layer_sam` training step in static mode.

  Static mode is where partial-layer SAM saves compute: with the selection
  fixed at trace time, XLA drops the second-pass work of the layers that are
  not perturbed. Each selection is a program of its own, and compiling one
  takes as long as hundreds of small steps, so this helper keeps compilation
  off the critical path. The rules (the layer_sam page of the documentation
  gives the reasoning and the measurements):

  * **Start.** With ``start=`` (a selection: layer indices or names, for
    example the layers nearest the output, whose step costs about an SGD
    step) the first step is static; without it, step 0 runs in dynamic mode
    (``selection=None``). Either way the state records every layer's gradient
    norm.
  * **Re-selection.** Before every step whose index is a multiple of
    ``every`` (and before step 1 in dynamic mode), the running norms
    :math:`a_l` (``grad_norm_avg``) give the candidate :math:`T`, the
    :math:`k` layers with the largest :math:`a_l`. A selection :math:`S` is
    scored by the squared norm it holds, :math:`s(S) = \sum_{l \in S} a_l^2`.
    :math:`T` *wins* against the current selection :math:`C` if
    :math:`s(T) > (1 + m)\, s(C)`, :math:`m` = ``margin`` (always, from the
    start selection or dynamic mode).
  * **Compile ahead.** The first time :math:`T` wins and has no executable,
    it is compiled in a background thread (one at a time) on the abstract
    shapes of the step's arguments, while the current executable keeps
    training; the step switches to :math:`T` at the first call after the
    compile is ready. Without a background compiler (``background=False``, or
    a step that is not a ``jit`` function) the step switches at once and
    compiles on its first call.
  * **Hysteresis.** A change away from a static selection that is not the
    start needs :math:`T` to win at ``patience`` consecutive re-selections.
  * **Pay-off.** A selection that needs a compile is compiled only if the
    steps left (``total_steps`` minus the steps run, or ``horizon`` when the
    length is unknown), at the current measured step time, take at least
    ``payoff`` times the compile's expected cost on the critical path: the
    mean measured compile time, times the share of a background compile
    that measured steps lost to it (:math:`1/2` until measured; all of it in
    the foreground). ``payoff=0`` turns the rule off.
  * **Bounded compilation.** Once ``max_compilations`` programs (dynamic
    mode, the start and every compiled selection) exist, a candidate without
    one is replaced by the best compiled static selection, to which the
    same rules apply.

  Step times are measured over the windows between re-selections (where the
  norms are read, so the host waits for the device anyway): the intervals
  between calls and that wait, without intervals over five times their
  median (the caller's evaluations). The compile seconds on the critical
  path are those of compiles in the foreground plus the time that windows
  with a background compile in flight took beyond their steps' measured
  time. :meth:`log` reports both.

  Because the step at which a background compile is ready depends on the
  machine, two runs of one seed can switch at different steps; with
  ``background=False`` and ``payoff=0`` every decision depends on the
  optimizer state alone, and a run resumed with :meth:`load_state_dict`
  equals an uninterrupted one bit for bit. With several JAX processes
  (``jax.process_count() > 1``) that mode is taken whatever the arguments
  say, so that every process switches at the same step.

  The state is found after each re-selection step in what the step returned
  (a functional ``(params, opt_state)`` loop) or else in its arguments (an
  ``nnx.Optimizer``, updated in place); ``state_fn`` overrides that search.
  If the state found is the very one of the previous re-selection (a step
  that returns only the loss, or an ``nnx`` step under ``jax.jit``, which
  does not write its updates back), :class:`StaticSelection` raises a
  ``ValueError`` that says what to change.

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

      with optax_lgm.StaticSelection(
          train_step, start=('dense', 'head'), total_steps=1000) as step:
        for x, y in batches:
          loss_value = step(model, optimizer, x, y)
      print(step.selection, step.compilations, step.changes)

    A functional loop with ``jax.jit``, compiling in the foreground:

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
    >>> step = optax_lgm.StaticSelection(
    ...     train_step, every=5, start=('a',), background=False, payoff=0)
    >>> opt_state = tx.init(params)
    >>> for _ in range(12):
    ...   params, opt_state = step(params, opt_state)
    >>> step.selection, step.compilations, step.changes
    ((2,), 2, [(5, (2,))])

  Args:
    step_fn: the training step; it takes ``selection`` as a keyword argument
      (static under ``jit``) and hands it to ``layer_sam``'s ``update``.
    every: re-select before every step whose index is a multiple of
      ``every``.
    margin: :math:`m` in the rule, ``>= 0``; ``0``: any strictly better
      candidate wins.
    max_compilations: the most programs (dynamic mode and the start
      included) the run may compile, ``>= 2``.
    k: how many layers to select; ``None``: as many as ``start`` names, or
      as many as ``layer_sam`` perturbed at step 0 in dynamic mode.
    by: what ranks the layers: ``"average"`` (the running average of the
      norms) or ``"last"`` (the last step's norms).
    state_fn: optional ``(outputs, args, kwargs) -> opt_state``, where to
      find the ``layer_sam`` state after a step.
    start: the first selection (layer indices or names, resolved against the
      state's layer names); ``None`` for a dynamic step 0.
    patience: consecutive re-selections a candidate must win before a static
      selection is left, ``>= 1``.
    background: compile new selections in a background thread.
    compile_fn: ``(selection, abstract_args, abstract_kwargs) -> Any``, what
      the background thread runs; by default ``step_fn.trace(...)``
      ``.lower().compile()``, which fills the cache the next call of
      ``step_fn`` looks up.
    total_steps: the length of the run, for the pay-off rule.
    horizon: the steps left assumed by the pay-off rule when ``total_steps``
      is ``None``.
    payoff: the factor of the pay-off rule, ``>= 0``.

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
    start: Optional[Sequence[Any]] = None,
    patience: int = 2,
    background: bool = True,
    compile_fn: Optional[CompileFn] = None,
    total_steps: Optional[int] = None,
    horizon: int = 1000,
    payoff: float = 4.0,
  ):
    if not callable(step_fn):
      raise TypeError(f"step_fn must be callable, got step_fn={step_fn!r}.")
    for name, count, lower in (
      ("every", every, 1),
      ("max_compilations", max_compilations, 2),
      ("patience", patience, 1),
      ("horizon", horizon, 1),
    ):
      _check_int(name, count, lower)
    if total_steps is not None:
      _check_int("total_steps", total_steps, 0)
    for name, value in (("margin", margin), ("payoff", payoff)):
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {name}={value!r}.")
      _common.check_number(name, value, lower=0.0)
    if k is not None:
      _check_int("k", k, 1)
    _common.check_choice("by", by, ("average", "last"))
    if start is not None and (
      isinstance(start, (str, bytes)) or not isinstance(start, Sequence) or not start
    ):
      raise ValueError(
        "start must be None or a non-empty tuple of layer indices or names, "
        f"got start={start!r}."
      )
    if compile_fn is not None and not callable(compile_fn):
      raise TypeError(f"compile_fn must be callable, got compile_fn={compile_fn!r}.")
    self.step_fn = step_fn
    self.every = every
    self.margin = float(margin)
    self.max_compilations = max_compilations
    self.k = k
    self.by = by
    self.state_fn = state_fn
    self.start = None if start is None else tuple(start)
    self.patience = patience
    self.total_steps = total_steps
    self.horizon = horizon
    self.payoff = float(payoff)
    self._compile_fn = compile_fn if compile_fn is not None else aot_compile(step_fn)
    self.background = bool(background) and self._compile_fn is not None
    if background and self._compile_fn is None:
      warnings.warn(
        "StaticSelection compiles in the foreground: step_fn has no trace/lower "
        "(it is not a jax.jit or nnx.jit function); give compile_fn= to compile "
        "in the background.",
        stacklevel=2,
      )
    self.selection: Selection = None
    self.step = 0
    self.changes: list[tuple[int, Selection]] = []
    self._started = False
    self._used: list[Selection] = []  # Distinct selections run, in order.
    # Programs built (compile seconds; 0 for those restored from a checkpoint,
    # which count towards the bound), and those built in this process.
    self._programs: dict[Selection, float] = {}
    self._here: set[Selection] = set()
    self._streak: tuple[Selection, int] = (None, 0)
    self._want: Selection = None  # Decided; switched to once it is ready.
    self._queued: Selection = None  # Compiled from the next call's arguments.
    self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
    self._pending: Optional[tuple[Selection, concurrent.futures.Future]] = None
    self._step_seconds: dict[Selection, float] = {}
    self._critical_seconds = 0.0
    self._background_seconds = 0.0
    self._excess_seconds = 0.0  # Critical-path share of background compiles.
    self._window: dict[str, Any] = {}
    self._last_began: Optional[float] = None
    self._last_count: Any = None

  # The public figures.

  @property
  def compilations(self) -> int:
    """How many programs (selections, dynamic mode included) were compiled."""
    return len(self._programs) + (self.compiling is not None)

  @property
  def selections(self) -> tuple[Selection, ...]:
    """The distinct selections run so far, in the order they first ran."""
    return tuple(self._used)

  @property
  def compiling(self) -> Selection:
    """The selection being compiled in the background, or ``None``."""
    return self._queued if self._pending is None else self._pending[0]

  # The step.

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    """Runs one step with the current selection and re-selects if due."""
    if "selection" in kwargs:
      raise TypeError(
        "StaticSelection passes selection= itself; call it without "
        f"selection (got selection={kwargs['selection']!r})."
      )
    try:
      if not self._started:
        self._begin(args, kwargs)
      self._collect()
      self._switch_if_ready()
      if self._queued is not None:  # The abstract arguments of this very call.
        self._compile_ahead(self._queued, args, kwargs)
        self._queued = None
      outputs = self._run(args, kwargs)
      if self.step % self.every == 0 or (self.selection is None and self._want is None):
        self._reselect(outputs, args, kwargs)
        self._collect()
        self._switch_if_ready()
    except BaseException:
      self.close(wait=False)
      raise
    return outputs

  def _same_in_every_process(self) -> None:
    if jax.process_count() > 1:
      # Every process must switch at the same step, and only the optimizer
      # state is the same everywhere: no timing may decide.
      self.background, self.payoff, self._queued = False, 0.0, None

  def _begin(self, args: tuple, kwargs: dict) -> None:
    self._started = True
    self._same_in_every_process()
    self._window = {}
    if self.start is not None and self.step == 0 and self.selection is None:
      names = tuple(self._state(None, args, kwargs).names.names)
      self.selection = tuple(
        sorted(
          {_selection.layer_index(s, self.start, names, "start") for s in self.start}
        )
      )
      if self.k is None:
        self.k = len(self.selection)

  def _run(self, args: tuple, kwargs: dict) -> Any:
    selection = self.selection
    if selection not in self._used:
      self._used.append(selection)
    first = selection not in self._here
    began = time.perf_counter()
    previous, self._last_began = self._last_began, began
    outputs = self.step_fn(*args, selection=selection, **kwargs)
    self.step += 1
    if first:  # Compiled on the critical path; the clock of steps restarts.
      seconds = time.perf_counter() - began
      self._here.add(selection)
      if not self._programs.get(selection):
        self._programs[selection] = seconds
      self._critical_seconds += seconds
      self._window, self._last_began = {}, None
      return outputs
    if previous is not None:  # The previous step, as the host saw it.
      self._window.setdefault("intervals", []).append(began - previous)
    self._window.setdefault("selections", set()).add(selection)
    if self._pending is not None:
      self._window["background"] = True
    return outputs

  # Background compilation.

  def _compile_ahead(self, selection: Selection, args: tuple, kwargs: dict) -> None:
    if not self.background:
      return
    assert self._compile_fn is not None and self._pending is None
    if self._executor is None:
      self._executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="optax_lgm-compile"
      )
    abstract_args, abstract_kwargs = _abstract((args, kwargs))
    compile_fn = self._compile_fn

    def work() -> float:
      began = time.perf_counter()
      compile_fn(selection, abstract_args, abstract_kwargs)
      return time.perf_counter() - began

    self._pending = (selection, self._executor.submit(work))
    self._window["background"] = True

  def _collect(self) -> None:
    """Takes in a finished background compile (raising its error, if any)."""
    if self._pending is None or not self._pending[1].done():
      return
    selection, future = self._pending
    self._pending = None
    seconds = future.result()  # Raises what the compile raised.
    self._programs[selection] = seconds
    self._here.add(selection)
    self._background_seconds += seconds

  def wait(self) -> None:
    """Blocks until the compile in flight, if any, is ready (and switches)."""
    if self._pending is not None:
      concurrent.futures.wait([self._pending[1]])
      self._collect()
      self._switch_if_ready()

  def close(self, wait: bool = True) -> None:
    """Ends the background thread (after the compile in flight, if ``wait``)."""
    if self._executor is not None:
      self._executor.shutdown(wait=wait, cancel_futures=True)
      self._executor = None
    if self._pending is not None and self._pending[1].done():
      self._collect()

  def __enter__(self) -> "StaticSelection":
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close(wait=exc_info[0] is None)

  # Decisions.

  def _switch_if_ready(self) -> None:
    want = self._want
    if want is None or want == self.selection:
      return
    if self.background and want not in self._programs:
      return
    self.selection = want
    self._want = None
    self._streak = (None, 0)
    self.changes.append((self.step, want))

  def _find_state(self, outputs: Any, args: tuple, kwargs: dict) -> Any:
    if self.state_fn is not None:
      return _find_layer_sam_state(self.state_fn(outputs, args, kwargs))
    state = _find_layer_sam_state(outputs)
    return state if state is not None else _find_layer_sam_state((args, kwargs))

  def _state(self, outputs: Any, args: tuple, kwargs: dict) -> LayerSamState:
    state = self._find_state(outputs, args, kwargs)
    if state is None:
      raise ValueError(
        "StaticSelection found no LayerSamState (from optax_lgm.layer_sam) in "
        "the step's outputs or arguments; return the optimizer state from the "
        "step, pass the nnx.Optimizer as an argument, or give state_fn=."
      )
    count = getattr(state.count, "value", state.count)  # nnx wraps the arrays.
    if count is self._last_count:
      raise ValueError(
        f"StaticSelection found the same layer_sam state after step {self.step} "
        "as before it: the step did not hand back its updated state, so the "
        "selection can never leave its start. Return the new optimizer state "
        "from a functional step (e.g. `return params, opt_state, loss`), or jit "
        "an nnx step with nnx.jit(..., static_argnames='selection') (jax.jit "
        "does not write an nnx.Optimizer's updates back)."
      )
    self._last_count = count
    return state

  def _reselect(self, outputs: Any, args: tuple, kwargs: dict) -> None:
    state = self._state(outputs, args, kwargs)
    norms = np.asarray(
      jax.device_get(state.grad_norm_avg if self.by == "average" else state.grad_norm),
      dtype=np.float64,
    )
    self._close_window()  # The host has waited for the device: a clean clock.
    if not np.any(norms > 0):
      # No finite step yet (the first was skipped, e.g. by apply_if_finite):
      # stay as is and try again after the next step.
      return
    if self.k is None:
      self.k = int(np.sum(jax.device_get(state.selected)))
    candidate = _selection.largest(norms, self.k)
    if candidate not in self._programs and self.compilations >= self.max_compilations:
      compiled = [s for s in self._programs if s is not None]
      if not compiled:
        return
      candidate = max(compiled, key=lambda s: self.score(s, norms))
    self._decide(candidate, norms)

  def _decide(self, candidate: Selection, norms: np.ndarray) -> None:
    current = self.selection
    leaving_start = current is None or (self.start is not None and not self.changes)
    wins = candidate != current and (
      leaving_start
      or self.score(candidate, norms) > (1.0 + self.margin) * self.score(current, norms)
    )
    self._want = None
    if not wins:
      self._streak = (None, 0)
      return
    count = self._streak[1] + 1 if self._streak[0] == candidate else 1
    self._streak = (candidate, count)
    if leaving_start and candidate not in self._programs:
      # A selection compiled for an earlier candidate beats the start too.
      compiled = [s for s in self._programs if s not in (None, current)]
      best = max(compiled, key=lambda s: self.score(s, norms), default=None)
      if best is not None and self.score(best, norms) > self.score(current, norms):
        self._want = best
        return
    if candidate not in self._programs:
      compiling = self.compiling
      if compiling is not None and compiling != candidate:
        # One compile at a time: the candidate must win again. Off the start,
        # the selection being compiled (a recent top-k) is still taken.
        self._want = compiling if leaving_start else None
        return
      if compiling is None:
        if not self._pays():
          return
        if self.background:
          self._queued = candidate
    if leaving_start or count >= self.patience:
      self._want = candidate

  def _pays(self) -> bool:
    """The pay-off rule for a selection that must be compiled."""
    if self.payoff == 0:
      return True
    step_seconds = self._step_seconds.get(self.selection)
    if step_seconds is None or not any(self._programs.values()):
      return True  # Nothing measured yet.
    left = self.horizon if self.total_steps is None else self.total_steps - self.step
    return left * step_seconds >= self.payoff * self.expected_compile_seconds()

  def expected_compile_seconds(self) -> float:
    """What the next compile is expected to cost on the critical path."""
    measured = [s for s in self._programs.values() if s > 0]
    seconds = float(np.mean(measured)) if measured else 0.0
    if not self.background:
      return seconds
    share = _UNMEASURED_SHARE
    if self._background_seconds > 0:
      share = min(1.0, self._excess_seconds / self._background_seconds)
    return seconds * share

  def _close_window(self) -> None:
    """Turns the intervals between the calls of a window into a step time.

    Called once the host has read the norms, so it has waited for every
    queued step: the intervals between the calls and the wait at the end sum
    to the device's time for the window's steps, except for the intervals
    over five times their median, the caller's evaluations or checkpoints,
    which are left out with their step.
    """
    now = time.perf_counter()
    window, self._window = self._window, {}
    if self._pending is not None:
      self._window["background"] = True
    intervals = window.get("intervals", [])
    if not intervals or len(window.get("selections", ())) != 1:
      return  # Only windows of one program, compiled before, time its steps.
    (selection,) = window["selections"]
    kept = [t for t in intervals if t <= 5.0 * float(np.median(intervals))]
    drain = 0.0 if self._last_began is None else now - self._last_began
    per_step = (sum(kept) + drain) / (len(kept) + 1)
    known = self._step_seconds.get(selection)
    if window.get("background"):
      if known is not None:
        self._excess_seconds += (len(kept) + 1) * max(0.0, per_step - known)
      return
    self._step_seconds[selection] = (
      per_step if known is None else 0.5 * known + 0.5 * per_step
    )

  @staticmethod
  def score(selection: Selection, norms: np.ndarray) -> float:
    r""":math:`s(S) = \sum_{l \in S} a_l^2`, the squared norm ``selection`` holds.

    Dynamic mode (``None``) holds the top layers of every step: it scores 0,
    so any candidate wins against it.
    """
    if selection is None:
      return 0.0
    return float(np.sum(np.square(norms[list(selection)])))

  # Checkpoints and records.

  def state_dict(self) -> dict[str, Any]:
    """The host state, as JSON-serialisable Python values (for checkpoints).

    A background compile in flight is recorded and started again by the
    first call after :meth:`load_state_dict`; the compile seconds so far are
    kept, measured step times are not.
    """

    def to_list(selection: Selection) -> Optional[list[int]]:
      return None if selection is None else list(selection)

    return {
      "step": self.step,
      "selection": to_list(self.selection),
      "selections": [to_list(s) for s in self._used],
      "compiled": [to_list(s) for s in self._programs],
      "changes": [[step, to_list(s)] for step, s in self.changes],
      "compiling": to_list(self.compiling),
      "want": to_list(self._want),
      "streak": [to_list(self._streak[0]), self._streak[1]],
      "k": self.k,
      "seconds": [
        self._critical_seconds,
        self._background_seconds,
        self._excess_seconds,
      ],
    }

  def load_state_dict(self, state: dict[str, Any]) -> None:
    """Restores what :meth:`state_dict` returned, so a resumed run continues.

    Programs compiled before the restore count towards ``max_compilations``
    and are compiled again in this process when they run (JAX's persistent
    compilation cache makes that a load); a compile that was in flight is
    started again in the background at the next call.
    """

    def to_tuple(selection: Optional[Sequence[int]]) -> Selection:
      return None if selection is None else tuple(int(i) for i in selection)

    self.step = int(state["step"])
    self.selection = to_tuple(state["selection"])
    self._used = [to_tuple(s) for s in state["selections"]]
    self.changes = [(int(step), to_tuple(s)) for step, s in state["changes"]]
    compiled = state.get("compiled", state["selections"])
    self._programs = {to_tuple(s): 0.0 for s in compiled}
    self._here = set()
    self._queued = to_tuple(state.get("compiling"))
    self._want = to_tuple(state.get("want"))
    streak = state.get("streak", [None, 0])
    self._streak = (to_tuple(streak[0]), int(streak[1]))
    self.k = state.get("k", self.k)
    seconds = state.get("seconds", [0.0, 0.0, 0.0])
    self._critical_seconds, self._background_seconds, self._excess_seconds = map(
      float, seconds
    )
    self._started = True
    self._window, self._last_began = {}, None
    self._same_in_every_process()
    if not self.background:
      self._queued = None

  def log(self) -> dict[str, Any]:
    """What to record in a run's metrics: compilations, their seconds, changes."""
    state = self.state_dict()
    return {
      "compilations": self.compilations,
      "selection": state["selection"],
      "selection_changes": state["changes"],
      "compile_seconds_critical": self._critical_seconds + self._excess_seconds,
      "compile_seconds_background": self._background_seconds,
      "step_seconds": {
        str(None if s is None else list(s)): t for s, t in self._step_seconds.items()
      },
    }


def _check_int(name: str, value: Any, lower: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < lower:
    raise ValueError(f"{name} must be an int >= {lower}, got {name}={value!r}.")
