"""Partial-layer sharpness-aware minimisation (Lee 2024).

:func:`layer_sam` runs SAM's second pass on the ``k`` layers with the largest
gradient norms only. With a static ``selection`` XLA prunes the rest of that
pass; :func:`select_layers` picks the selection from the running layer norms
in the state, and :class:`optax_lgm.StaticSelection` re-selects in a training
loop. The "Partial-layer SAM" page of the documentation has the maths, the
loop and what a step costs.
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
      at each finite step; kept, unchanged, with the other schedules).
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

  With first-pass gradient :math:`g` at weights :math:`w` and :math:`S` the
  ``k`` layers with the largest norms :math:`\lVert g_l \rVert_2`, the
  optimizer receives :math:`\nabla L(w + \epsilon)_l` for :math:`l \in S`,
  where :math:`\epsilon_l = \rho\, g_l / (\lVert g_S \rVert + \varepsilon)`,
  and :math:`g_l` elsewhere. ``update`` takes ``params`` and ``grad_fn``, a
  function ``(params, i) -> gradients`` (``optax.contrib.sam``'s opaque mode),
  and optionally ``selection``: ``None`` chooses :math:`S` in the graph (the
  exact algorithm, at SAM's cost), a tuple of layer indices or names fixes it
  at trace time, and XLA prunes the rest of the second pass. Its optional
  ``perturb`` says which steps run the second pass: ``None`` lets
  ``schedule`` decide in the graph (under :func:`jax.lax.cond`), ``True`` /
  ``False`` runs / skips it, chosen at trace time (two programs, no
  conditional). The
  "Partial-layer SAM" page of the documentation has the maths of every option
  (ASAM, per-device perturbation, perturbation schedules, LookSAM's reuse).

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
    axis_name: ``None`` (the gradients are global, as under ``jax.jit``) or
      the mapped data axis (a str or a tuple of str) of ``jax.shard_map`` /
      ``jax.pmap``: per-device (m-sharpness) perturbations.
    schedule: which steps run the second pass: ``"every"`` (every ``every``
      steps), ``"random"`` (with probability ``probability``) or
      ``"adaptive"`` (AE-SAM's rule).
    every: the period of ``schedule="every"``, an int ``>= 1``. A loop that
      counts its steps can decide on the host instead of in the graph:
      ``update(..., perturb=(step % every == 0))``, with ``perturb`` a static
      argument of the jitted step, gives the same run with no conditional
      (the faster one on XLA:CPU for convolutional networks).
    probability: the probability of a perturbed step with
      ``schedule="random"``, in ``[0, 1]``.
    seed: the seed of the PRNG key of ``schedule="random"``, an int.
    threshold: :math:`c_t` of ``schedule="adaptive"``, a number or a
      schedule of the step count.
    threshold_decay: :math:`\delta` of ``schedule="adaptive"``, in ``[0, 1]``.
    skipped: what a step that is not perturbed hands on: ``"plain"`` (the
      first-pass gradient) or ``"orthogonal"`` (LookSAM's reuse).
    orthogonal_scale: LookSAM's :math:`\alpha` (0.7 in its experiments, as we
      read them), ``>= 0``.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`; its ``update`` takes
    ``params``, ``grad_fn`` and optionally ``selection`` and ``perturb``
    (``None``, or a Python bool: whether this step runs the second pass,
    whatever ``schedule`` says; the state records it as a step of that kind);
    other extra arguments go to ``optimizer``.

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
      of str, an ``every`` or ``seed`` that is not an int, and (in
      ``update``) a ``perturb`` that is not ``None`` or a Python bool (a
      traced one: make it a static argument of the jitted step).

  References:
    Lee et al., `Layer-wise Adaptive Gradient Norm Penalizing Method for
    Efficient and Accurate Deep Learning <https://arxiv.org/abs/2503.14205>`_,
    2024.

    Foret et al., `Sharpness-Aware Minimization
    <https://arxiv.org/abs/2010.01412>`_, 2021; Kwon et al., `ASAM
    <https://arxiv.org/abs/2102.11600>`_, 2021; Liu et al., `LookSAM
    <https://arxiv.org/abs/2203.02714>`_, 2022; Zhao et al., `RST
    <https://arxiv.org/abs/2203.09962>`_, 2022; Jiang et al., `AE-SAM
    <https://arxiv.org/abs/2304.14647>`_, 2023.
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
    perturb: Optional[bool] = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, LayerSamState]:
    grad_fn = _check_update_arguments(updates, params, grad_fn)
    _check_perturb(perturb)
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
      adv = perturbed_params(lay_sel, params, updates, coef)
      adv = _sharding.vary_like(adv, updates, axis_name)
      g2 = grad_fn(adv, 0)
      lay.flatten_as(g2, "grad_fn's output")
      sam_grads = merge(lay_sel, gbar, g2, sel)
      return sam_grads, store_orthogonal(lay, gbar, sam_grads, sq, state.orthogonal)

    def plain_step():
      return reuse_orthogonal(lay, gbar, sq, state.orthogonal), state.orthogonal

    total_sq = jnp.sum(sq)
    moments = sq_norm_moments(state, total_sq)
    # Only the random schedule draws: the others leave the key (and the
    # program) without a PRNG.
    key, draw = (
      jax.random.split(state.key) if schedule == "random" else (state.key, None)
    )
    if perturb is not None:  # Chosen on the host: no conditional.
      take = jnp.asarray(perturb, bool)
      sam_grads, orthogonal = sam_step() if perturb else plain_step()
    elif always:
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

  def perturbed_params(lay_sel, params, updates, coef):
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


def _check_perturb(perturb: Any) -> None:
  """Raises a ``TypeError`` for a ``perturb`` that is not None or a Python bool."""
  if perturb is None or isinstance(perturb, (bool, np.bool_)):
    return
  if isinstance(perturb, (jax.Array, jax.core.Tracer)):
    raise TypeError(
      f"perturb must be a Python bool, fixed at trace time, got a "
      f"{type(perturb).__name__} (traced, or an array): make it a static "
      "argument of the jitted step, "
      "jax.jit(step, static_argnames='perturb') or "
      "nnx.jit(step, static_argnames='perturb'), and pass a Python bool, "
      "e.g. perturb=(step % every == 0); or leave perturb=None and let the "
      "schedule decide in the graph."
    )
  raise TypeError(
    f"perturb must be None (the schedule decides), True or False, got "
    f"perturb={perturb!r} of type {type(perturb).__name__}."
  )


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
  return _selection.largest(norms, k)


def find_layer_sam_state(tree: Any) -> Optional[LayerSamState]:
  """The first :class:`LayerSamState` in ``tree`` (a pytree), or ``None``."""
  for node in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, LayerSamState)):
    if isinstance(node, LayerSamState):
      return node
  return None
