"""Partial-layer sharpness-aware minimisation (Lee 2024).

SAM (Foret et al., 2021) takes the gradient at weights perturbed along the
normalised gradient, which costs a second forward and backward pass per step.
Lee et al. (2024) perturb only the ``k`` layers with the largest gradient
norms. :func:`layer_sam` implements that rule in two modes.

**Dynamic mode** (``selection=None``, the default): the top-``k`` layers are
chosen inside the compiled step, from this step's gradient. This is the exact
algorithm, but it saves no compute: under ``jit`` a data-dependent selection
is a mask, and the whole second pass still runs.

**Static mode** (``selection=`` a tuple of layer indices or names): the
selection is fixed at trace time. Only the selected layers are perturbed (the
other leaves of the perturbed params are the very same arrays) and only their
second-pass gradients are used, so XLA drops the weight-gradient work of the
other layers and the backward pass below the lowest selected layer, and can
share the second forward pass up to that layer with the first (it is the same
computation). The cost of a static step is therefore set by the *lowest*
selected layer: the output layer alone costs about one SGD step, while any
input-side layer in the selection brings back most of a forward and a
backward pass. The state keeps running per-layer gradient norms, and
:func:`select_layers` turns them, on the host, into the next selection.

The training loop of static mode jits the step with ``selection`` as a static
argument and re-selects every so many steps; ``jit`` compiles one step per
distinct selection (a selection seen before is not compiled again), and the
top layers change rarely, so few are compiled: a 60-step ResNet-20 run
re-selecting every 10 steps (``benchmarks/layer_sam_speed.py``) compiled 3
steps, one dynamic and two static::

  tx = optax_lgm.layer_sam(optax.sgd(0.1, momentum=0.9), rho=0.05, k=2)

  @functools.partial(jax.jit, static_argnames='selection')
  def train_step(params, opt_state, batch, selection=None):
    grad_fn = jax.grad(lambda p, _: loss(p, batch))
    grads = grad_fn(params, 0)
    updates, opt_state = tx.update(
        grads, opt_state, params, grad_fn=grad_fn, selection=selection)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  selection = None  # The first step runs in dynamic mode: it measures norms.
  for step, batch in enumerate(batches):
    if step % 100 == 1:
      selection = optax_lgm.select_layers(opt_state)  # A tuple of ints.
    params, opt_state = train_step(params, opt_state, batch, selection)

With Flax NNX, split the model so that the second pass runs on a functional
copy whose BatchNorm statistics are thrown away (``nnx.as_pure`` gives it
fresh copies of the statistics, which it may update inside ``jax.grad``)::

  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit(static_argnames='selection')
  def train_step(model, optimizer, x, y, selection=None):
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    rest = nnx.as_pure(rest)

    def grad_fn(params, _):  # Second pass: running statistics untouched.
      return jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest), x, y))(params)

    grads = nnx.grad(loss)(model, x, y)  # First pass: updates the statistics.
    optimizer.update(model, grads, grad_fn=grad_fn, selection=selection)

XLA:CPU and BatchNorm. XLA shares the two forward passes only if they are
still identical when its common-subexpression pass runs. On XLA:CPU (jax
0.10) the earlier ``reshape-mover`` pass rewrites the BatchNorm arithmetic of
the two passes differently (their users differ), so the second forward pass
is computed again: on a ResNet-20, perturbing the two output-side layers
costs 1.33x an SGD step in FLOPs instead of 1.00x. Disabling that pass
restores the sharing: ``jax.jit(train_step, compiler_options={
'xla_disable_hlo_passes': 'reshape-mover'})``, or
``XLA_FLAGS=--xla_disable_hlo_passes=reshape-mover`` for ``nnx.jit``.
Networks without BatchNorm share the forward pass without it.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_lgm import _common, _layers

_NORMALIZE = ("selected", "global")
_UNSELECTED = ("reuse", "recompute")

Selection = Optional[Sequence[Union[int, str]]]
AxisName = Union[None, str, tuple[str, ...]]


class LayerSamState(NamedTuple):
  """State of :func:`layer_sam`.

  Attributes:
    count: number of finite steps taken (drives a ``rho`` schedule), int32.
    grad_norm: the first-pass gradient norm of each layer at the last finite
      step, float32, shape ``[num_layers]``.
    grad_norm_avg: an exponential moving average (decay ``norm_decay``,
      seeded with the first observation) of ``grad_norm``; what
      :func:`select_layers` ranks.
    selected: 1 for the layers perturbed at the last finite step, else 0,
      int32, shape ``[num_layers]``.
    selected_count: how many steps each layer has been perturbed (the paper's
      Figure 5), int32, shape ``[num_layers]``.
    inner_state: the state of the wrapped optimizer.
    names: the layer names (static), in the order of the arrays above and of
      the indices of ``selection``.
  """

  count: jax.Array
  grad_norm: jax.Array
  grad_norm_avg: jax.Array
  selected: jax.Array
  selected_count: jax.Array
  inner_state: optax.OptState
  names: _layers.LayerNames

  def diagnostics(self) -> dict[str, jax.Array]:
    """Per-layer arrays to log, by statistic name."""
    return {
      "sam_grad_norm": self.grad_norm,
      "sam_grad_norm_avg": self.grad_norm_avg,
      "sam_selected": self.selected,
      "sam_selected_count": self.selected_count,
    }


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
  names: _layers.LayerNames

  def diagnostics(self) -> dict[str, jax.Array]:
    """Per-layer arrays to log, by statistic name."""
    return {
      "top_k_grad_norm": self.grad_norm,
      "top_k_selected": self.selected,
      "top_k_selected_count": self.selected_count,
    }


def _is_none(x: Any) -> bool:
  return x is None


def _check_k(k: Any) -> None:
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


def _check_k_fits(k: Any, num_layers: int) -> None:
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


def _top_k(norms: jax.Array, k: Any) -> jax.Array:
  """Boolean mask of the ``k`` largest ``norms``; ties go to the lower index."""
  n = norms.shape[0]
  if k is None:
    return jnp.ones([n], bool)
  if isinstance(k, (int, np.integer)):
    return _layers.top_k_mask(norms, int(k))
  # A traced k (optax.inject_hyperparams): rank the layers, O(num_layers^2).
  idx = jnp.arange(n)
  before = (norms[None, :] > norms[:, None]) | (
    (norms[None, :] == norms[:, None]) & (idx[None, :] < idx[:, None])
  )
  return jnp.sum(before, axis=1) < k


def _static_selection(selection: Any, layering: _layers.Layering) -> np.ndarray:
  """Turns a ``selection`` (indices or names) into a boolean NumPy mask."""
  n = layering.num_layers
  if isinstance(selection, (jax.Array, jax.core.Tracer)) or not isinstance(
    selection, (tuple, list, np.ndarray)
  ):
    raise ValueError(
      "selection must be None (dynamic mode) or a tuple of layer indices or "
      "names, hashable so that it can be a static argument of jax.jit "
      "(jax.jit(step, static_argnames='selection')), got "
      f"selection={selection!r} of type {type(selection).__name__}."
    )
  mask = np.zeros([n], bool)
  for item in selection:
    if isinstance(item, str):
      if item not in layering.names:
        raise ValueError(
          f"selection names a layer {item!r} that the params do not have; "
          f"the layers are {layering.names}."
        )
      mask[layering.names.index(item)] = True
      continue
    if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
      raise ValueError(
        f"selection must hold layer indices (ints) or names (str), got "
        f"{item!r} in selection={selection!r}."
      )
    if not 0 <= item < n:
      raise ValueError(
        f"selection holds the index {int(item)}, out of range for {n} layers "
        f"(valid indices: 0 to {n - 1}), in selection={selection!r}."
      )
    mask[int(item)] = True
  return mask


def _check_axis_name(axis_name: Any) -> None:
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


def _pmean_inexact(tree: Any, axis_name: AxisName) -> Any:
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


def _axes(axis_name: Union[str, tuple[str, ...]]) -> tuple[str, ...]:
  return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def _varying_axes(x: Any) -> frozenset:
  """The mesh axes over which ``x`` varies inside ``jax.shard_map``.

  Empty outside ``shard_map``, under ``check_vma=False``, ``pmap`` and
  ``vmap``, which do not track it.
  """
  aval = jax.typeof(x) if hasattr(jax, "typeof") else jax.core.get_aval(x)
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
  return jax.lax.pvary(x, missing)


def _flatten_like(layering: _layers.Layering, tree: Any, what: str) -> list:
  try:
    return layering.flatten(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(
      f"{what} must have the structure of the gradients "
      f"({layering.treedef}), got {jax.tree.structure(tree, is_leaf=_is_none)}."
    ) from e


def layer_sam(
  optimizer: optax.GradientTransformation,
  rho: optax.ScalarOrSchedule = 0.05,
  k: Optional[int] = 2,
  *,
  layers: _layers.Layers = "module",
  normalize: str = "selected",
  unselected: str = "reuse",
  adaptive: bool = False,
  eta: jax.typing.ArrayLike = 0.01,
  eps: jax.typing.ArrayLike = 1e-12,
  norm_decay: jax.typing.ArrayLike = 0.9,
  layer_axes: _layers.LayerAxes = None,
  mask: _layers.Mask = None,
  axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Sharpness-aware minimisation that perturbs only the top-k layers.

  With first-pass gradient :math:`g` at weights :math:`w`, each step computes
  the layer norms :math:`n_l = \lVert g_l \rVert_2`, the set :math:`S` of the
  ``k`` layers with the largest :math:`n_l`, and

  .. math::

    \epsilon_l &= \begin{cases}
      \rho\, g_l / (\lVert g_S \rVert + \varepsilon) & l \in S \\
      0 & l \notin S
    \end{cases}
    \qquad\text{or, with } T = |w| + \eta \text{ (ASAM):}\quad
    \epsilon_l = \rho\, T_l^2 g_l / (\lVert (T g)_S \rVert + \varepsilon), \\
    g' &= \nabla L(w + \epsilon), \qquad
    \tilde g_l = \begin{cases} g'_l & l \in S \\
      g_l \text{ (reuse) or } g'_l \text{ (recompute)} & l \notin S
    \end{cases}

  and hands :math:`\tilde g` to ``optimizer``. With ``normalize="global"``
  the norm in the denominator runs over every layer instead of :math:`S`. With
  ``k=None``, ``normalize="selected"`` and ``unselected="recompute"`` this is
  SAM, equal to ``optax.contrib.sam(optimizer, optax.chain(
  optax.contrib.normalize(), optax.sgd(rho)), opaque_mode=True)``.

  ``update`` takes ``grad_fn``, a function ``(params, i) -> gradients`` (the
  same one as ``optax.contrib.sam``'s opaque mode; ``i`` is always 0), and
  optionally ``selection``:

  * ``selection=None`` (dynamic mode): :math:`S` is chosen in the graph from
    this step's :math:`g`. Exact, but the full second pass always runs.
  * ``selection=`` a tuple of layer indices (the order of
    :func:`optax_lgm.layer_names`) or names (static mode): :math:`S` is that
    tuple, fixed at trace time; ``k`` is then not used. Only the selected
    leaves are perturbed and only their second-pass gradients are read, so
    XLA prunes the rest of the second pass; the saving needs
    ``unselected="reuse"``. Pass ``selection`` as a static argument of
    ``jax.jit`` and re-select every few hundred steps with
    :func:`select_layers` (see the module docstring for the loop).

  On a device mesh under ``jax.jit``, the gradients are global whatever the
  sharding, and so is the perturbation. Inside ``jax.shard_map`` (or
  ``jax.pmap``), where ``grads`` and ``grad_fn``'s output are each device's
  own (its shard of the batch, not averaged), pass ``axis_name`` (the data
  axis) for *m-sharpness* (Foret et al., 2021): with
  :math:`g^{(d)}` device :math:`d`'s gradient and
  :math:`\bar g = \operatorname{pmean}_d g^{(d)}`,

  .. math::

    n_l = \lVert \bar g_l \rVert_2, \qquad
    \epsilon^{(d)}_l = \rho\, g^{(d)}_l / (\lVert g^{(d)}_S \rVert
      + \varepsilon) \ (l \in S), \qquad
    \tilde g_l = \operatorname{pmean}_d \nabla L^{(d)}(w + \epsilon^{(d)})_l
      \ (l \in S), \quad \bar g_l \ (l \notin S,\ \text{reuse}).

  So the layer norms, the selection :math:`S` and the state are those of the
  global gradient :math:`\bar g` (the same on every device; ``jax.lax.pmean``
  of the first-pass gradient, one all-reduce), each device perturbs along its
  own gradient, normalised by its own norm, and the gradient handed to
  ``optimizer`` is averaged over ``axis_name`` (second-pass gradients only
  where they are read). Every device then holds the same state. With one
  device per axis this is the global perturbation. Inside ``shard_map``, take
  the first-pass gradient at ``jax.lax.pcast(params, axis_name,
  to="varying")`` (JAX sums the gradient of replicated params over the axis
  otherwise); ``update`` marks the weights it hands to ``grad_fn`` the same
  way. Every device must see whole layers: split the params only over mesh
  axes left to the compiler (``jax.shard_map(..., axis_names={"data"})``).

  Defaults, from ``python -m benchmarks.layer_sam_speed --defaults
  --train-steps 60 --ks 1,2,3,4`` (a ResNet-20 trained 60 SGD steps at batch
  128 on 32x32 digits, probed every 10 steps; "captured" is the share of full
  SAM's gradient correction :math:`\langle \tilde g - g, g_{SAM} - g\rangle /
  \lVert g_{SAM} - g \rVert^2` that the layer-SAM gradient recovers):
  ``k=1, 2, 3, 4`` captured 0.192, 0.328, 0.375, 0.450 with
  ``layers="module"``. The second layer adds 0.136, the third 0.047 and the
  fourth 0.075, so ``k=2`` is the knee. In dynamic mode ``k`` does not change
  the cost; in static mode ``k=1`` selected the output layer alone (1.00x an
  SGD step in FLOPs) while the second layer was an input-side convolution
  (1.66x; 1.71x at ``k=4``; full SAM 2.00x). ``layers="leaf"`` captured the
  same (0.189, 0.325, 0.374, 0.449) and selected the same kernels;
  ``"module"`` is the default because it ranks a ``Dense``'s kernel and bias,
  or a BatchNorm's scale and bias, as one layer and perturbs them together
  (39 layers instead of 59 on the ResNet-20), so a lone bias is never
  selected. The figures are on the results page of the documentation.

  Leaves that carry no statistic (``None``, size-1 and non-float leaves and
  those outside ``mask``) are never perturbed and receive :math:`g`
  (``"reuse"``) or :math:`g'` (``"recompute"``). Statistics are float32; the
  gradient handed on has each leaf's dtype. On a step whose first- or
  second-pass gradient is not finite the whole state (the wrapped optimizer's
  included) is left as it was; the returned updates are then not finite,
  which :func:`optax.apply_if_finite` detects and skips.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_lgm
    >>> def loss(p):
    ...   return jnp.sum((p['a']['w'] - 1.0) ** 2) + jnp.sum(p['b']['w'] ** 2)
    >>> params = {'a': {'w': jnp.zeros(3)}, 'b': {'w': jnp.full(2, 5.0)}}
    >>> grad_fn = jax.grad(lambda p, _: loss(p))
    >>> tx = optax_lgm.layer_sam(optax.sgd(0.1), rho=0.05, k=1)
    >>> state = tx.init(params)
    >>> grads = grad_fn(params, 0)
    >>> updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    >>> optax_lgm.layer_stats(state)['sam_selected']
    {'a': np.int32(0), 'b': np.int32(1)}
    >>> optax_lgm.select_layers(state)
    (1,)
    >>> updates, state = tx.update(
    ...     grads, state, params, grad_fn=grad_fn, selection=(1,))

  Args:
    optimizer: the optimizer that receives the SAM gradient (e.g.
      ``optax.sgd(0.1, momentum=0.9)``).
    rho: the radius of the perturbation, a number or a schedule of the step.
    k: how many layers to perturb in dynamic mode; ``None`` for every layer.
    layers: what a layer is: ``"leaf"``, ``"module"`` or a callable
      ``(path, leaf) -> label`` (see :func:`optax_lgm.layer_names`).
    normalize: ``"selected"`` (divide by the norm over the selected layers)
      or ``"global"`` (over every layer).
    unselected: what the layers outside :math:`S` receive: ``"reuse"`` (the
      first-pass gradient; the cheap default) or ``"recompute"`` (the
      second-pass gradient).
    adaptive: whether to scale the perturbation by :math:`T^2` (ASAM).
    eta: the :math:`\eta` of ASAM's :math:`T = |w| + \eta`.
    eps: added to the norm in the denominator (guards a zero gradient).
    norm_decay: decay of the running average of the layer norms that
      :func:`select_layers` ranks, in ``[0, 1]``.
    layer_axes: leading axes of a leaf that index separate (stacked) layers.
    mask: a pytree of booleans or a callable returning one; leaves where it
      is ``False`` are never perturbed.
    axis_name: ``None`` (the default: ``grads`` and ``grad_fn`` give the
      global gradient, as under ``jax.jit``), or the name (a str, or a tuple
      of str) of the mapped data axis of ``jax.shard_map`` / ``jax.pmap``
      whose devices each see their own gradient: per-device (m-sharpness)
      perturbations, with the selection and the gradient handed on averaged
      over that axis.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`; its ``update`` takes
    ``params``, ``grad_fn`` and optionally ``selection``; other extra
    arguments go to ``optimizer``.

  Raises:
    ValueError: for ``k < 1``, ``k`` larger than the number of layers,
      ``rho < 0``, an unknown ``normalize`` / ``unselected`` / ``layers``, and
      (in ``update``) a missing ``grad_fn`` or ``params`` or a ``selection``
      with an index out of range.
    TypeError: for an ``axis_name`` that is not ``None``, a str or a tuple
      of str.

  References:
    Lee et al., `Layer-wise Adaptive Gradient Norm Penalizing Method for
    Efficient and Accurate Deep Learning <https://arxiv.org/abs/2503.14205>`_,
    2024.

    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, 2021.

    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks
    <https://arxiv.org/abs/2102.11600>`_, 2021.
  """
  _check_k(k)
  if not callable(rho):
    _common.check_number("rho", rho, lower=0.0)
  _common.check_number("eta", eta, lower=0.0)
  _common.check_number("eps", eps, lower=0.0)
  _common.check_number("norm_decay", norm_decay, lower=0.0, upper=1.0)
  _common.check_choice("normalize", normalize, _NORMALIZE)
  _common.check_choice("unselected", unselected, _UNSELECTED)
  _common.check_choice("adaptive", adaptive, (False, True))
  _layers.check_layers(layers)
  _layers.check_layer_axes(layer_axes)
  _check_axis_name(axis_name)
  inner = optax.with_extra_args_support(optimizer)
  f32 = jnp.float32

  def layering(tree: Any) -> _layers.Layering:
    return _layers.make_layering(tree, layers, layer_axes=layer_axes, mask=mask)

  def init_fn(params: optax.Params) -> LayerSamState:
    lay = layering(params)
    _check_k_fits(k, lay.num_layers)
    n = lay.num_layers
    return LayerSamState(
      count=jnp.zeros([], jnp.int32),
      grad_norm=jnp.zeros([n], f32),
      grad_norm_avg=jnp.zeros([n], f32),
      selected=jnp.zeros([n], jnp.int32),
      selected_count=jnp.zeros([n], jnp.int32),
      inner_state=inner.init(params),
      names=_layers.state_names(params, lay),
    )

  def update_fn(
    updates: optax.Updates,
    state: LayerSamState,
    params: Optional[optax.Params] = None,
    *,
    grad_fn: Optional[Callable[[optax.Params, int], optax.Updates]] = None,
    selection: Selection = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, LayerSamState]:
    if grad_fn is None:
      raise ValueError(
        "layer_sam's update needs grad_fn, a function (params, i) -> "
        "gradients (as in optax.contrib.sam's opaque mode): "
        "tx.update(grads, state, params, grad_fn=grad_fn)."
      )
    if params is None:
      raise ValueError(
        "layer_sam's update needs params (the weights to perturb): "
        "tx.update(grads, state, params, grad_fn=grad_fn)."
      )
    lay = layering(updates)
    _check_k_fits(k, lay.num_layers)
    static = None if selection is None else _static_selection(selection, lay)
    g_flat = lay.flatten(updates)  # This device's gradient (m-sharpness).
    w_flat = _flatten_like(lay, params, "params")

    def pmean(tree: Any) -> Any:
      return _pmean_inexact(tree, axis_name)

    # The global first-pass gradient: what the layer norms, the selection, the
    # state and the unselected layers ("reuse") see. Without axis_name it is
    # the gradient given.
    gbar = pmean(updates)
    gbar_flat = lay.flatten(gbar)
    sq = lay.reduce(jnp.square, gbar, dtype=f32)
    norms = jnp.sqrt(sq)
    sel = _top_k(norms, k) if static is None else jnp.asarray(static)

    # The perturbation follows this device's gradient (with axis_name) and is
    # normalised by its own norm.
    if adaptive:
      scaled = lay.map(
        lambda g, w: (jnp.abs(w.astype(f32)) + eta) * g.astype(f32),
        updates,
        params,
      )
      denom_sq = lay.reduce(jnp.square, scaled, dtype=f32)
    elif axis_name is not None:
      denom_sq = lay.reduce(jnp.square, updates, dtype=f32)
    else:
      denom_sq = sq
    if normalize == "selected":
      denom_sq = jnp.where(sel, denom_sq, 0.0)
    rho_t = rho(state.count) if callable(rho) else rho
    scale = jnp.asarray(rho_t, f32) / (jnp.sqrt(jnp.sum(denom_sq)) + eps)
    # Per layer: rho / norm where selected, 0 elsewhere. A per-layer scalar
    # times the gradient, as in SAM, rather than a select on the weights.
    coef = scale * sel.astype(f32)

    # Static mode: which slices of leaf i are selected (a NumPy bool array).
    def leaf_mask(i: int) -> np.ndarray:
      return static[lay.leaf_layers[i]]

    def perturb(i: int, w: jax.Array, g: jax.Array) -> jax.Array:
      dtype = jnp.promote_types(w.dtype, f32)  # bf16 -> f32; f64 stays.
      w_ = w.astype(dtype)
      e = lay.expand(coef, i, jnp.ndim(w)).astype(dtype) * g.astype(dtype)
      if adaptive:
        e = e * jnp.square(jnp.abs(w_) + eta)
      return (w_ + e).astype(w.dtype)

    adv_flat = []
    for i, (w, g, ids) in enumerate(zip(w_flat, g_flat, lay.leaf_layers)):
      if ids is None or w is None or g is None:
        adv_flat.append(w)  # Never perturbed.
      elif static is not None and not leaf_mask(i).any():
        adv_flat.append(w)  # The very same array: the second pass shares it.
      else:
        adv_flat.append(perturb(i, w, g))

    if axis_name is not None and any(_varying_axes(g) for g in g_flat if g is not None):
      # Inside jax.shard_map (check_vma=True), the gradient with respect to
      # weights that do not vary over the axis comes back summed over it;
      # mark every leaf as varying so that grad_fn gives this device's own.
      adv_flat = [
        w if w is None else _to_varying(w, _axes(axis_name)) for w in adv_flat
      ]
    g2_flat = _flatten_like(
      lay, grad_fn(lay.unflatten(adv_flat), 0), "grad_fn's output"
    )

    # Second-pass gradients are averaged over axis_name only where they are
    # read, so that static mode still prunes the rest.
    out_flat = []
    for i, (g, g2, ids) in enumerate(zip(gbar_flat, g2_flat, lay.leaf_layers)):
      if g is None:
        out_flat.append(None)
        continue
      if unselected == "recompute":
        out_flat.append(pmean(g2).astype(g.dtype))
      elif ids is None:
        out_flat.append(g)
      elif static is None:
        take = lay.expand(sel, i, jnp.ndim(g))
        out_flat.append(jnp.where(take, pmean(g2).astype(g.dtype), g))
      elif leaf_mask(i).all():
        out_flat.append(pmean(g2).astype(g.dtype))
      elif not leaf_mask(i).any():
        out_flat.append(g)  # grad_fn's gradient of this leaf is never read.
      else:  # Stacked layers (layer_axes), some slices selected.
        take = lay.expand(jnp.asarray(static), i, jnp.ndim(g))
        out_flat.append(jnp.where(take, pmean(g2).astype(g.dtype), g))
    sam_grads = lay.unflatten(out_flat)

    out_sq = lay.reduce(jnp.square, sam_grads, dtype=f32)
    finite = jnp.isfinite(jnp.sum(sq)) & jnp.isfinite(jnp.sum(out_sq))

    new_updates, inner_state = inner.update(
      sam_grads, state.inner_state, params, **extra_args
    )

    first = state.count == 0
    avg = jnp.where(
      first, norms, norm_decay * state.grad_norm_avg + (1 - norm_decay) * norms
    ).astype(f32)
    picked = sel.astype(jnp.int32)
    new_state = LayerSamState(
      count=optax.safe_increment(state.count),
      grad_norm=norms,
      grad_norm_avg=avg,
      selected=picked,
      selected_count=jnp.where(
        sel, optax.safe_increment(state.selected_count), state.selected_count
      ),
      inner_state=inner_state,
      names=state.names,
    )
    return new_updates, optax.tree.where(finite, new_state, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def keep_top_k_layers(
  k: Optional[int],
  *,
  layers: _layers.Layers = "module",
  layer_axes: _layers.LayerAxes = None,
  mask: _layers.Mask = None,
  axis_name: AxisName = None,
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
  _check_k(k)
  _layers.check_layers(layers)
  _layers.check_layer_axes(layer_axes)
  _check_axis_name(axis_name)

  def layering(tree: Any) -> _layers.Layering:
    return _layers.make_layering(tree, layers, layer_axes=layer_axes, mask=mask)

  def init_fn(params: optax.Params) -> KeepTopKLayersState:
    lay = layering(params)
    _check_k_fits(k, lay.num_layers)
    n = lay.num_layers
    return KeepTopKLayersState(
      grad_norm=jnp.zeros([n], jnp.float32),
      selected=jnp.zeros([n], jnp.int32),
      selected_count=jnp.zeros([n], jnp.int32),
      names=_layers.state_names(params, lay),
    )

  def update_fn(updates, state, params=None):
    del params
    lay = layering(updates)
    _check_k_fits(k, lay.num_layers)
    gbar = _pmean_inexact(updates, axis_name)
    norms = jnp.sqrt(lay.reduce(jnp.square, gbar, dtype=jnp.float32))
    sel = _top_k(norms, k)
    out = []
    for i, (g, ids) in enumerate(zip(lay.flatten(updates), lay.leaf_layers)):
      if g is None:
        out.append(None)
      elif ids is None:
        out.append(jnp.zeros_like(g))
      else:
        out.append(jnp.where(lay.expand(sel, i, jnp.ndim(g)), g, jnp.zeros_like(g)))
    finite = jnp.isfinite(jnp.sum(norms))
    picked = sel.astype(jnp.int32)
    new_state = KeepTopKLayersState(
      grad_norm=norms,
      selected=picked,
      selected_count=jnp.where(
        sel, optax.safe_increment(state.selected_count), state.selected_count
      ),
      names=state.names,
    )
    return lay.unflatten(out), optax.tree.where(finite, new_state, state)

  return optax.GradientTransformation(init_fn, update_fn)


def select_layers(
  opt_state: Any, k: Optional[int] = None, *, by: str = "average"
) -> tuple[int, ...]:
  """Picks the next static ``selection`` of :func:`layer_sam` from its state.

  A host-side helper for static mode: it finds the :class:`LayerSamState`
  wherever it sits in ``opt_state`` (inside ``optax.chain``,
  ``inject_hyperparams``, ``MultiSteps``, an ``nnx.Optimizer``'s
  ``opt_state``...), ranks the layers by their running gradient norm and
  returns the indices of the ``k`` largest, sorted, as a tuple of Python ints
  (hashable: a valid static argument of ``jax.jit``).

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_lgm
    >>> params = {'a': jnp.ones(4), 'b': jnp.ones(4), 'c': jnp.ones(4)}
    >>> grad_fn = jax.grad(lambda p, _: jnp.sum(p['a']) + 3 * jnp.sum(p['c']))
    >>> tx = optax_lgm.layer_sam(optax.sgd(0.1), k=2)
    >>> state = tx.init(params)
    >>> _, state = tx.update(grad_fn(params, 0), state, params, grad_fn=grad_fn)
    >>> optax_lgm.select_layers(state)
    (0, 2)
    >>> optax_lgm.select_layers(state, k=1)
    (2,)

  Args:
    opt_state: an optimizer state containing a :class:`LayerSamState`.
    k: how many layers; ``None`` for as many as were perturbed at the last
      step (the ``k`` of the transformation, in dynamic mode).
    by: ``"average"`` (the running average of the norms, ``grad_norm_avg``)
      or ``"last"`` (the last step's norms).

  Returns:
    A sorted tuple of layer indices.

  Raises:
    ValueError: if ``opt_state`` holds no :class:`LayerSamState`, if no step
      has been taken and ``k`` is ``None``, or for a bad ``k`` or ``by``.
  """
  _common.check_choice("by", by, ("average", "last"))
  _check_k(k)
  found = [
    node
    for node in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, LayerSamState)
    )
    if isinstance(node, LayerSamState)
  ]
  if not found:
    raise ValueError("opt_state holds no LayerSamState (from optax_lgm.layer_sam).")
  state = found[0]
  norms = np.asarray(
    jax.device_get(state.grad_norm_avg if by == "average" else state.grad_norm)
  )
  if k is None:
    k = int(np.sum(jax.device_get(state.selected)))
    if k == 0:
      raise ValueError(
        "select_layers needs k: the state has no step yet (or selected no "
        "layer at its last step)."
      )
  if k > norms.shape[0]:
    raise ValueError(f"k={k} is larger than the number of layers ({norms.shape[0]}).")
  # Stable sort: ties go to the lower index, as in the dynamic selection.
  order = np.argsort(-norms, kind="stable")[:k]
  return tuple(sorted(int(i) for i in order))
