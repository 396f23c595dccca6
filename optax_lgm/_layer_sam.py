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
top layers change rarely, so few are compiled (the results page of the
documentation counts them on a ResNet-20)::

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

:class:`optax_lgm.StaticSelection` runs this loop for a step that takes
``selection=`` (with Flax NNX as well: its docstring has the step, whose
second pass runs on a functional copy of the model so that BatchNorm's
running statistics are left alone).

XLA:CPU and BatchNorm. XLA shares the two forward passes only if they are
still identical when its common-subexpression pass runs. On XLA:CPU (jax
0.10) the earlier ``reshape-mover`` pass rewrites the BatchNorm arithmetic of
the two passes differently (their users differ), so the second forward pass
is computed again (the results page measures the cost on a ResNet-20).
Disabling that pass restores the sharing: ``jax.jit(train_step, compiler_options={
'xla_disable_hlo_passes': 'reshape-mover'})``, or
``XLA_FLAGS=--xla_disable_hlo_passes=reshape-mover`` for ``nnx.jit``.
Networks without BatchNorm share the forward pass without it.
"""

from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_lgm import _common, _layers, _reductions, _selection, _sharding, _state_names
from optax_lgm._keep_top_k import KeepTopKLayersState as KeepTopKLayersState
from optax_lgm._keep_top_k import keep_top_k_layers as keep_top_k_layers

_NORMALIZE = ("selected", "global")
_UNSELECTED = ("reuse", "recompute")
_SCHEDULES = ("every", "random", "adaptive")
_SKIPPED = ("plain", "orthogonal")
_MaskedNode = getattr(optax, "MaskedNode", None)
GradFn = Callable[[optax.Params, int], optax.Updates]


class LayerSamState(NamedTuple):
  r"""State of :func:`layer_sam`.

  Attributes:
    count: number of finite steps taken (drives a ``rho`` schedule), int32.
    grad_norm: the first-pass gradient norm of each layer at the last finite
      step, float32, shape ``[num_layers]``.
    grad_norm_avg: an exponential moving average (decay ``norm_decay``,
      seeded with the first observation) of ``grad_norm``; what
      :func:`select_layers` ranks.
    selected: 1 for the layers selected at the last finite step, else 0,
      int32, shape ``[num_layers]``; they were perturbed if that step was (see
      ``perturbed``).
    selected_count: how many steps each layer has been perturbed (the paper's
      Figure 5), int32, shape ``[num_layers]``.
    perturbed: 1 if the last finite step ran the second pass (the
      ``schedule`` chose it), else 0, int32.
    perturbed_count: how many steps have run the second pass, int32.
    sq_norm_avg: the running mean :math:`\mu` of the squared norm of the
      first-pass gradient (AE-SAM's statistic; kept with every schedule),
      float32.
    sq_norm_var: its running variance :math:`\sigma^2`, float32.
    key: the PRNG key of ``schedule="random"`` (a raw ``uint32[2]`` key, split
      at each finite step; kept with every schedule).
    orthogonal: with ``skipped="orthogonal"``, LookSAM's stored component
      :math:`g_v` of the last SAM gradient orthogonal to its first-pass
      gradient (shaped like the params, in their dtypes); else an
      ``optax.EmptyState``.
    inner_state: the state of the wrapped optimizer.
    names: the layer names (static), in the order of the arrays above and of
      the indices of ``selection``.
  """

  count: jax.Array  # type: ignore[assignment]  # Shadows tuple.count, as in optax.
  grad_norm: jax.Array
  grad_norm_avg: jax.Array
  selected: jax.Array
  selected_count: jax.Array
  perturbed: jax.Array
  perturbed_count: jax.Array
  sq_norm_avg: jax.Array
  sq_norm_var: jax.Array
  key: jax.Array
  orthogonal: optax.Updates
  inner_state: optax.OptState
  names: _state_names.LayerNames

  def diagnostics(self) -> dict[str, jax.Array]:
    """Per-layer arrays to log, by statistic name.

    ``sam_perturbed_steps`` is the number of steps that ran the second pass,
    the same for every layer; ``sam_selected_count`` is each layer's own.
    """
    fields = ("grad_norm", "grad_norm_avg", "selected", "selected_count")
    stats = _state_names.prefixed(self, "sam_", fields)
    stats["sam_perturbed_steps"] = jnp.broadcast_to(
      self.perturbed_count, jnp.shape(self.selected)
    )
    return stats


def _check_update_arguments(
  updates: optax.Updates, params: Optional[optax.Params], grad_fn: Optional[GradFn]
) -> GradFn:
  """Returns ``grad_fn``; raises a ``ValueError`` for what ``update`` lacks."""
  if grad_fn is None:
    raise ValueError(
      "layer_sam's update needs grad_fn, a function (params, i) -> "
      "gradients (as in optax.contrib.sam's opaque mode): "
      "tx.update(grads, state, params, grad_fn=grad_fn)."
    )
  _common.check_grad_fn(grad_fn)
  if params is None:
    raise ValueError(
      "layer_sam's update needs params (the weights to perturb): "
      "tx.update(grads, state, params, grad_fn=grad_fn)."
    )
  if _MaskedNode is not None and any(
    isinstance(x, _MaskedNode)
    for x in jax.tree.leaves(updates, is_leaf=lambda x: isinstance(x, _MaskedNode))
  ):
    raise ValueError(
      "layer_sam is inside optax.partition or optax.masked: grad_fn would "
      "receive optax's MaskedNode placeholders instead of the other "
      "partitions' weights. Wrap the whole model instead and say which "
      "leaves take part with layer_sam(..., mask=...)."
    )
  return grad_fn


def _where(take: Any, a: jax.Array, b: jax.Array) -> jax.Array:
  """``jnp.where(take, a, b)``; a static (NumPy) ``take`` picks at trace time.

  Picking at trace time leaves the unread second-pass gradients out of the
  graph, which is what lets XLA prune them in static mode.
  """
  if isinstance(take, np.ndarray):
    if take.all():
      return a
    if not take.any():
      return b
  return jnp.where(take, a, b)


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
  axis_name: _sharding.AxisName = None,
  schedule: str = "every",
  every: jax.typing.ArrayLike = 1,
  probability: jax.typing.ArrayLike = 0.5,
  seed: jax.typing.ArrayLike = 0,
  threshold: optax.ScalarOrSchedule = 0.0,
  threshold_decay: jax.typing.ArrayLike = 0.9,
  skipped: str = "plain",
  orthogonal_scale: jax.typing.ArrayLike = 0.7,
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
    :func:`select_layers`, or let :class:`optax_lgm.StaticSelection` do it
    (the loop is on the "Partial-layer SAM" page of the documentation).

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

  The defaults ``k=2`` and ``layers="module"`` are measured: on a ResNet-20
  the second layer adds much of SAM's gradient correction and later layers
  little, and ``"module"`` ranks a ``Dense``'s kernel and bias (or a
  BatchNorm's scale and bias) as one layer, so a lone bias is never
  selected. In dynamic mode ``k`` does not change the cost; in static mode
  the lowest selected layer sets it. The figures are on the results page of
  the documentation ("Partial-layer SAM: speed" and the defaults table).

  Inside :func:`optax.partition` or :func:`optax.masked`, ``grad_fn`` would
  receive optax's placeholders for the leaves of the other partitions; use
  ``layer_sam(..., mask=...)`` instead (``update`` raises and says so).

  Leaves that carry no statistic (``None``, size-1 and non-float leaves and
  those outside ``mask``) are never perturbed and receive :math:`g`
  (``"reuse"``) or :math:`g'` (``"recompute"``). Statistics are float32; the
  gradient handed on has each leaf's dtype. On a step whose first- or
  second-pass gradient is not finite the whole state (the wrapped optimizer's
  included) is left as it was; the returned updates are then not finite,
  which :func:`optax.apply_if_finite` detects and skips.

  **Fewer SAM steps** (LookSAM, RST, AE-SAM). ``schedule`` decides at each
  step :math:`t` (the count of finite steps) whether the second pass runs:

  * ``"every"``: when :math:`t \bmod` ``every`` :math:`= 0` (LookSAM's and
    init2winit's :math:`k`). The default ``every=1`` perturbs every step.
  * ``"random"``: with probability ``probability`` (RST), drawn from a PRNG
    key kept in the state (from ``seed``, split at each finite step), so a
    run is reproducible and a resumed run draws what the uninterrupted one
    would have.
  * ``"adaptive"`` (AE-SAM): with :math:`s_t = \lVert g_t \rVert^2` (over
    the layers that take part) and :math:`\delta` = ``threshold_decay``,

    .. math::

      \mu_t = \delta \mu_{t-1} + (1 - \delta) s_t, \qquad
      \sigma_t^2 = \delta \sigma_{t-1}^2 + (1 - \delta) (s_t - \mu_t)^2,

    the step is perturbed when :math:`s_t \ge \mu_t + c_t \sigma_t`, with
    :math:`c_t` = ``threshold`` (a number or a schedule of :math:`t`). Our
    reading of Jiang et al. (2023): :math:`\delta = 0.9` and :math:`c_t`
    rising linearly from :math:`\lambda_1 = -1` to :math:`\lambda_2 = 1` over
    the :math:`T` steps of the run, i.e. ``threshold=optax.linear_schedule(
    -1.0, 1.0, T)``; the paper leaves :math:`\mu_0, \sigma_0` unstated, and
    here the averages are seeded with the first step (:math:`\mu = s`,
    :math:`\sigma = 0`: the first step is perturbed). As :math:`T` is not
    known here, the default is the constant :math:`c = 0`, the middle of
    that schedule.

  A step that is not perturbed hands on (``skipped``) the first-pass
  gradient :math:`g` (``"plain"``, an SGD step), or (``"orthogonal"``,
  LookSAM) reuses the component of the last SAM gradient orthogonal to its
  first-pass gradient: at a perturbed step
  :math:`g_v = \tilde g - \frac{\langle g, \tilde g \rangle}{\lVert g
  \rVert^2} g` is stored, and a skipped step hands on
  :math:`g + \alpha \lVert g \rVert\, g_v / (\lVert g_v \rVert +
  \varepsilon)`, :math:`\alpha` = ``orthogonal_scale`` (norms and inner
  products over the leaves that carry a statistic; the others receive
  :math:`g`).

  The second pass runs inside :func:`jax.lax.cond`: one compilation serves
  the perturbed and the skipped steps, and a skipped step costs about an SGD
  step. The decision reads only the state and the first-pass norms of the
  global gradient, the same on every device and process, so every device
  takes the same branch. A literal ``every=1`` with ``schedule="every"``
  (the default) builds no conditional: the step is that of SAM at every
  step. Inside the conditional XLA cannot share the second forward pass with
  the first, so a static ``selection`` saves less per perturbed step than
  without a schedule (the unused gradient work is still pruned). On XLA:CPU
  the convolutions inside the conditional lose their fast kernels, so there
  a perturbed step of a convolutional network costs several SAM steps (the
  "Partial-layer SAM" page of the documentation).

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
    {'a': 0, 'b': 1}
    >>> optax_lgm.select_layers(state)
    (1,)
    >>> updates, state = tx.update(
    ...     grads, state, params, grad_fn=grad_fn, selection=(1,))

    SAM every other step, reusing LookSAM's orthogonal component in between:

    >>> tx = optax_lgm.layer_sam(
    ...     optax.sgd(0.1), k=None, unselected="recompute", every=2,
    ...     skipped="orthogonal")
    >>> state = tx.init(params)
    >>> for _ in range(4):
    ...   updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    >>> int(state.perturbed_count)
    2

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
    schedule: which steps run the second pass: ``"every"`` (every ``every``
      steps), ``"random"`` (with probability ``probability``) or
      ``"adaptive"`` (AE-SAM's rule).
    every: the period of ``schedule="every"``, an int ``>= 1``.
    probability: the probability of a perturbed step with
      ``schedule="random"``, in ``[0, 1]``.
    seed: the seed of the PRNG key of ``schedule="random"``, an int.
    threshold: :math:`c_t` of ``schedule="adaptive"``, a number or a
      schedule of the step count.
    threshold_decay: :math:`\delta` of ``schedule="adaptive"``, the decay of
      the running mean and variance of the squared gradient norm, in
      ``[0, 1]``.
    skipped: what a step that is not perturbed hands on: ``"plain"`` (the
      first-pass gradient) or ``"orthogonal"`` (LookSAM's reuse).
    orthogonal_scale: LookSAM's :math:`\alpha` (0.7 in its experiments, as we
      read them), ``>= 0``.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`; its ``update`` takes
    ``params``, ``grad_fn`` and optionally ``selection``; other extra
    arguments go to ``optimizer``.

  Raises:
    ValueError: for ``k < 1``, ``k`` larger than the number of layers,
      ``rho < 0``, an unknown ``normalize`` / ``unselected`` / ``layers`` /
      ``schedule`` / ``skipped``, ``every < 1``, a ``probability`` or
      ``threshold_decay`` outside ``[0, 1]``, ``orthogonal_scale < 0``, and
      (in ``update``) a missing ``grad_fn`` or ``params``, a ``selection``
      that is empty, repeats a layer or holds an index out of range, trees
      of other structures than the gradients, or a call from inside
      :func:`optax.partition`.
    TypeError: for an ``axis_name`` that is not ``None``, a str or a tuple
      of str, and an ``every`` or ``seed`` that is not an int.

  References:
    Lee et al., `Layer-wise Adaptive Gradient Norm Penalizing Method for
    Efficient and Accurate Deep Learning <https://arxiv.org/abs/2503.14205>`_,
    2024.

    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, 2021.

    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks
    <https://arxiv.org/abs/2102.11600>`_, 2021.

    Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.02714>`_ (LookSAM), 2022.

    Zhao et al., `Randomized Sharpness-Aware Training for Boosting
    Computational Efficiency in Deep Learning
    <https://arxiv.org/abs/2203.09962>`_ (RST), 2022.

    Jiang et al., `An Adaptive Policy to Employ Sharpness-Aware Minimization
    <https://arxiv.org/abs/2304.14647>`_ (AE-SAM), 2023.
  """
  _selection.check_k(k)
  if not callable(rho):
    _common.check_number("rho", rho, lower=0.0)
  _common.check_number("eta", eta, lower=0.0)
  _common.check_number("eps", eps, lower=0.0)
  _common.check_number("norm_decay", norm_decay, lower=0.0, upper=1.0)
  _common.check_choice("normalize", normalize, _NORMALIZE)
  _common.check_choice("unselected", unselected, _UNSELECTED)
  _common.check_choice("adaptive", adaptive, (False, True))
  _sharding.check_axis_name(axis_name)
  _common.check_choice("schedule", schedule, _SCHEDULES)
  _common.check_choice("skipped", skipped, _SKIPPED)
  _check_int("every", every, lower=1)
  _check_int("seed", seed)
  _common.check_number("probability", probability, lower=0.0, upper=1.0)
  if not callable(threshold):
    _common.check_number("threshold", threshold)
  _common.check_number("threshold_decay", threshold_decay, lower=0.0, upper=1.0)
  _common.check_number("orthogonal_scale", orthogonal_scale, lower=0.0)
  # A literal every=1 perturbs every step: no conditional, today's graph. An
  # injected every (an array) takes the conditional whatever its value.
  always = (
    schedule == "every"
    and not isinstance(every, (jax.Array, np.ndarray))
    and bool(every == 1)
  )
  _common.check_optimizer("optimizer", optimizer)
  spec = _layers.LayerSpec(layers, layer_axes, mask)
  inner = optax.with_extra_args_support(optimizer)
  f32 = jnp.float32

  def init_fn(params: optax.Params) -> LayerSamState:
    lay = spec(params)
    _selection.check_k_fits(k, lay.num_layers)
    n = lay.num_layers
    return LayerSamState(
      count=jnp.zeros([], jnp.int32),
      grad_norm=jnp.zeros([n], f32),
      grad_norm_avg=jnp.zeros([n], f32),
      selected=jnp.zeros([n], jnp.int32),
      selected_count=jnp.zeros([n], jnp.int32),
      perturbed=jnp.zeros([], jnp.int32),
      perturbed_count=jnp.zeros([], jnp.int32),
      sq_norm_avg=jnp.zeros([], f32),
      sq_norm_var=jnp.zeros([], f32),
      key=jax.random.PRNGKey(seed),
      orthogonal=(
        optax.tree.zeros_like(params) if skipped == "orthogonal" else optax.EmptyState()
      ),
      inner_state=inner.init(params),
      names=_state_names.state_names(params, lay),
    )

  def update_fn(
    updates: optax.Updates,
    state: LayerSamState,
    params: Optional[optax.Params] = None,
    *,
    grad_fn: Optional[GradFn] = None,
    selection: _selection.Selection = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, LayerSamState]:
    grad_fn = _check_update_arguments(updates, params, grad_fn)
    lay = spec(updates)
    _state_names.check_names(lay, state.names, updates)
    lay.flatten_as(params, "params")
    _selection.check_k_fits(k, lay.num_layers)

    # The global first-pass gradient: what the layer norms, the selection, the
    # state and the unselected layers ("reuse") see. Without axis_name it is
    # the gradient given; with it, updates are this device's own.
    gbar = _sharding.pmean_inexact(updates, axis_name)
    sq = _reductions.sums(lay, jnp.square, gbar, dtype=f32)
    norms = jnp.sqrt(sq)
    sel: Any  # A traced mask, or a NumPy one in static mode.
    if selection is None:
      sel, lay_sel = _selection.top_k(norms, k), lay
    else:  # Static: only the leaves of selected layers take part below.
      sel = _selection.static_mask(selection, lay)
      lay_sel = lay.restrict(sel)

    def sam_step():
      coef = perturbation_coefficients(lay, updates, params, sq, sel, state.count)
      adv = perturb(lay_sel, params, updates, coef)
      adv = _sharding.vary_like(adv, updates, axis_name)
      g2 = grad_fn(adv, 0)
      lay.flatten_as(g2, "grad_fn's output")
      sam_grads = merge(lay_sel, gbar, g2, sel)
      return sam_grads, store_orthogonal(lay, gbar, sam_grads, sq, state.orthogonal)

    def plain_step():
      return reuse_orthogonal(lay, gbar, sq, state.orthogonal), state.orthogonal

    total_sq = jnp.sum(sq)
    moments = sq_norm_moments(state, total_sq)
    key, draw = jax.random.split(state.key)
    if always:
      take = jnp.ones([], bool)
      sam_grads, orthogonal = sam_step()
    else:
      take = perturb_now(state, total_sq, moments, draw)
      sam_grads, orthogonal = jax.lax.cond(take, sam_step, plain_step)

    out_sq = _reductions.sums(lay, jnp.square, sam_grads, dtype=f32)
    finite = jnp.isfinite(total_sq) & jnp.isfinite(jnp.sum(out_sq))
    new_updates, inner_state = inner.update(
      sam_grads, state.inner_state, params, **extra_args
    )
    new_state = next_state(
      state, norms, sel, take, moments, key, orthogonal, inner_state
    )
    return new_updates, optax.tree.where(finite, new_state, state)

  def sq_norm_moments(state, total_sq):
    """AE-SAM's running mean and variance of the squared gradient norm.

    Seeded with the first step (mean ``s``, variance 0), as the other running
    averages of this library.
    """
    first = state.count == 0
    d = jnp.asarray(threshold_decay, f32)
    mean = jnp.where(first, total_sq, d * state.sq_norm_avg + (1 - d) * total_sq)
    var = d * state.sq_norm_var + (1 - d) * jnp.square(total_sq - mean)
    return mean.astype(f32), jnp.where(first, 0.0, var).astype(f32)

  def perturb_now(state, total_sq, moments, draw):
    """Whether this step runs the second pass: a replicated scalar boolean.

    It derives from the state (replicated) and the norm of the global
    first-pass gradient only, so every device takes the same branch.
    """
    if schedule == "every":
      return state.count % jnp.asarray(every, jnp.int32) == 0
    if schedule == "random":
      return jax.random.bernoulli(draw, jnp.asarray(probability, f32))
    mean, var = moments
    c = threshold(state.count) if callable(threshold) else threshold
    return total_sq >= mean + jnp.asarray(c, f32) * jnp.sqrt(var)

  def store_orthogonal(lay, gbar, sam_grads, sq, stored):
    """LookSAM's ``g_v``: the SAM gradient's component orthogonal to ``g``."""
    if skipped != "orthogonal":
      return stored
    products = lay.map(lambda g, s: g.astype(f32) * s.astype(f32), gbar, sam_grads)
    dot = jnp.sum(_reductions.sums(lay, lambda x: x, products, dtype=f32))
    total = jnp.sum(sq)
    proj = jnp.where(total > 0, dot / jnp.where(total > 0, total, 1.0), 0.0)

    def component(g, s, old):
      v = s.astype(f32) - proj * g.astype(f32)
      return v.astype(old.dtype)

    return lay.map(
      component,
      gbar,
      sam_grads,
      stored,
      missing=lambda g, s, old: jnp.zeros_like(old),
    )

  def reuse_orthogonal(lay, gbar, sq, stored):
    """``g + alpha |g| g_v / |g_v|`` (LookSAM), or ``g`` with ``"plain"``."""
    if skipped != "orthogonal":
      return gbar
    v_norm = jnp.sqrt(jnp.sum(_reductions.sums(lay, jnp.square, stored, dtype=f32)))
    scale = jnp.asarray(orthogonal_scale, f32) * jnp.sqrt(jnp.sum(sq))
    scale = scale / (v_norm + eps)

    def reuse(g, v):
      return (g.astype(f32) + scale * v.astype(f32)).astype(g.dtype)

    return lay.map(reuse, gbar, stored)

  def perturbation_coefficients(lay, updates, params, sq, sel, count):
    """Per layer, rho over the norm of the perturbation where selected, else 0.

    The perturbation follows this device's gradient (with ``axis_name``) and
    is normalised by its own norm.
    """
    if adaptive:
      scaled = lay.map(
        lambda g, w: (jnp.abs(w.astype(f32)) + eta) * g.astype(f32), updates, params
      )
      denom_sq = _reductions.sums(lay, jnp.square, scaled, dtype=f32)
    elif axis_name is not None:
      denom_sq = _reductions.sums(lay, jnp.square, updates, dtype=f32)
    else:
      denom_sq = sq
    if normalize == "selected":
      denom_sq = jnp.where(sel, denom_sq, 0.0)
    rho_t = rho(count) if callable(rho) else rho
    scale = jnp.asarray(rho_t, f32) / (jnp.sqrt(jnp.sum(denom_sq)) + eps)
    # A per-layer scalar times the gradient, as in SAM, rather than a select
    # on the weights.
    return scale * jnp.asarray(sel, f32)

  def perturb(lay_sel, params, updates, coef):
    """``w + coef * g`` (times ``T**2`` for ASAM) on the leaves that take part.

    The other leaves are the very same arrays as in ``params``, so that the
    second pass shares their computation with the first.
    """

    def shift(w, g, c):
      dtype = jnp.promote_types(w.dtype, f32)  # bf16 -> f32; f64 stays.
      w_ = w.astype(dtype)
      e = c.astype(dtype) * g.astype(dtype)
      if adaptive:
        e = e * jnp.square(jnp.abs(w_) + eta)
      return (w_ + e).astype(w.dtype)

    return lay_sel.map(shift, params, updates, per_layer=[coef])

  def merge(lay_sel, gbar, g2, sel):
    """Second-pass gradients of the selected layers, first-pass elsewhere.

    Second-pass gradients are averaged over ``axis_name`` only where they are
    read, so that static mode still prunes the rest.
    """

    def second(g, g2_leaf):
      return _sharding.pmean_inexact(g2_leaf, axis_name).astype(g.dtype)

    if unselected == "recompute":
      return lay_sel.map(lambda g, g2_leaf, _: second(g, g2_leaf), gbar, g2,
                         per_layer=[sel], missing=second)  # fmt: skip
    return lay_sel.map(
      lambda g, g2_leaf, take: _where(take, second(g, g2_leaf), g),
      gbar,
      g2,
      per_layer=[sel],
    )

  def next_state(state, norms, sel, take, moments, key, orthogonal, inner_state):
    """Norms, their running averages, the selection and the counts."""
    first = state.count == 0
    avg = jnp.where(
      first, norms, norm_decay * state.grad_norm_avg + (1 - norm_decay) * norms
    ).astype(f32)
    sel = jnp.asarray(sel)
    return LayerSamState(
      count=optax.safe_increment(state.count),
      grad_norm=norms,
      grad_norm_avg=avg,
      selected=sel.astype(jnp.int32),
      selected_count=jnp.where(
        sel & take, optax.safe_increment(state.selected_count), state.selected_count
      ),
      perturbed=take.astype(jnp.int32),
      perturbed_count=jnp.where(
        take, optax.safe_increment(state.perturbed_count), state.perturbed_count
      ),
      sq_norm_avg=moments[0],
      sq_norm_var=moments[1],
      key=key,
      orthogonal=orthogonal,
      inner_state=inner_state,
      names=state.names,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_int(name: str, value: Any, *, lower: Optional[int] = None) -> None:
  """Raises for a Python value that is not an int (or is below ``lower``).

  Arrays (an injected hyperparameter) are not checked.
  """
  if isinstance(value, (jax.Array, np.ndarray)):
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {name}={value!r}.")
  if lower is not None and value < lower:
    raise ValueError(f"{name} must be an int >= {lower}, got {name}={value!r}.")


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
    ValueError: if ``opt_state`` holds no :class:`LayerSamState`, if it has
      taken no step (its layer norms are all zero), or for a bad ``k`` or
      ``by``.
  """
  _common.check_choice("by", by, ("average", "last"))
  _selection.check_k(k)
  state = find_layer_sam_state(opt_state)
  if state is None:
    raise ValueError("opt_state holds no LayerSamState (from optax_lgm.layer_sam).")
  norms = np.asarray(
    jax.device_get(state.grad_norm_avg if by == "average" else state.grad_norm)
  )
  if not np.any(norms):
    raise ValueError(
      "select_layers needs a state that has taken a step: the layer norms of "
      "this state are all zero, so there is nothing to rank. Run the first "
      "step in dynamic mode (selection=None), then select."
    )
  if k is None:
    k = int(np.sum(jax.device_get(state.selected)))
  if k > norms.shape[0]:
    raise ValueError(f"k={k} is larger than the number of layers ({norms.shape[0]}).")
  # Stable sort: ties go to the lower index, as in the dynamic selection.
  order = np.argsort(-norms, kind="stable")[:k]
  return tuple(sorted(int(i) for i in order))


def find_layer_sam_state(tree: Any) -> Optional[LayerSamState]:
  """The first :class:`LayerSamState` in ``tree`` (a pytree), or ``None``."""
  for node in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, LayerSamState)):
    if isinstance(node, LayerSamState):
      return node
  return None
