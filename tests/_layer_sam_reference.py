"""One step of layer-SAM in plain NumPy (float64): the reference of every test.

The params are ``{module: {leaf: array}}`` and a layer is a module
(``layers="module"``), in sorted order. Each entry of ``batches`` is one
shard's batch: with one shard this is the global perturbation; with several,
m-sharpness (``axis_name``): every shard perturbs along its own gradient.
"""

import numpy as np


def _mean(trees):
  return {
    m: {n: np.mean([t[m][n] for t in trees], axis=0) for n in trees[0][m]}
    for m in trees[0]
  }


def _layer_sq(tree, layers):
  return np.array([sum(np.sum(v**2) for v in tree[m].values()) for m in layers])


def layer_sam_step(
  w,
  batches,
  grad,
  *,
  k,
  rho,
  lr,
  normalize="selected",
  unselected="reuse",
  adaptive=False,
  eta=0.0,
  eps=1e-12,
):
  """One step of layer-SAM, then SGD; returns ``(w, norms, selected)``.

  1. Each shard's gradient ``g``; the layer norms of their mean select the
     ``k`` largest layers (ties to the lower index).
  2. Each shard perturbs the selected layers by ``rho * g / ||g_S||`` (its own
     norm; over every layer with ``normalize="global"``; ASAM: ``T**2 g`` over
     ``||T g||`` with ``T = |w| + eta``).
  3. Each shard's gradient at its perturbed weights; their mean ``g'``.
  4. The selected layers (every layer with ``unselected="recompute"``) take
     ``g'``, the others the mean first-pass gradient; then ``w - lr * g``.

  Args:
    w: the params, ``{module: {leaf: array}}``.
    batches: a list of ``(x, y)``, one per shard.
    grad: ``grad(w, x, y)``, the gradient of the loss, a tree like ``w``.
    k: the number of layers to perturb; ``None`` for every layer.
    rho: the radius of the perturbation.
    lr: the learning rate of the SGD that follows.
    normalize: ``"selected"`` or ``"global"``.
    unselected: ``"reuse"`` or ``"recompute"``.
    adaptive: whether to use ASAM's perturbation.
    eta: ASAM's ``eta``.
    eps: added to the norm.

  Returns:
    The new params, the layer norms and the boolean selection.
  """
  g_mean, g_sam, norms, sel = layer_sam_gradient(
    w,
    batches,
    grad,
    k=k,
    rho=rho,
    normalize=normalize,
    unselected=unselected,
    adaptive=adaptive,
    eta=eta,
    eps=eps,
  )
  new = {m: {n: w[m][n] - lr * g_sam[m][n] for n in w[m]} for m in w}
  return new, norms, sel


def layer_sam_gradient(
  w,
  batches,
  grad,
  *,
  k,
  rho,
  normalize="selected",
  unselected="reuse",
  adaptive=False,
  eta=0.0,
  eps=1e-12,
):
  """Steps 1 to 4 of `layer_sam_step`: ``(g, g_sam, norms, selected)``.

  ``g`` is the mean first-pass gradient, ``g_sam`` the gradient handed on.
  """
  layers = sorted(w)
  grads = [grad(w, x, y) for x, y in batches]
  g_mean = _mean(grads)
  norms = np.sqrt(_layer_sq(g_mean, layers))
  sel = np.zeros(len(layers), bool)
  sel[np.argsort(-norms, kind="stable")[: len(layers) if k is None else k]] = True
  t = {m: {n: np.abs(v) + eta for n, v in w[m].items()} for m in layers}
  second = []
  for g, (x, y) in zip(grads, batches):
    if adaptive:
      tg = {m: {n: t[m][n] * g[m][n] for n in w[m]} for m in layers}
      d = _layer_sq(tg, layers)
    else:
      d = _layer_sq(g, layers)
    denom = np.sqrt(np.sum(d[sel]) if normalize == "selected" else np.sum(d))
    adv = {}
    for j, m in enumerate(layers):
      adv[m] = {}
      for n in w[m]:
        e = rho * g[m][n] / (denom + eps)
        if adaptive:
          e = e * t[m][n] ** 2
        adv[m][n] = w[m][n] + (e if sel[j] else 0.0)
    second.append(grad(adv, x, y))
  g2 = _mean(second)
  take = sel | (unselected == "recompute")
  g_sam = {
    m: {n: (g2 if take[j] else g_mean)[m][n] for n in w[m]}
    for j, m in enumerate(layers)
  }
  return g_mean, g_sam, norms, sel


def _dot(a, b):
  return sum(np.sum(a[m][n] * b[m][n]) for m in a for n in a[m])


class ScheduledLayerSam:
  """Layer-SAM with a perturbation schedule, then SGD, step by step (float64).

  The schedule of ``layer_sam(schedule=..., skipped=...)`` at step ``t``
  (the count of steps), with ``s = ||g||^2`` over every layer:

  * ``"every"``: perturb when ``t % every == 0``;
  * ``"random"``: perturb when ``draws[t]`` is true (the test draws them
    from the key chain of the state: ``key, d = split(key)``,
    ``bernoulli(d, probability)``);
  * ``"adaptive"`` (AE-SAM): ``mu = delta mu + (1 - delta) s``,
    ``var = delta var + (1 - delta) (s - mu)^2`` (seeded: ``mu = s``,
    ``var = 0`` at ``t = 0``); perturb when ``s >= mu + c_t sqrt(var)``.

  A perturbed step hands on the layer-SAM gradient ``g_sam`` and, with
  ``skipped="orthogonal"`` (LookSAM), stores
  ``g_v = g_sam - <g, g_sam> / ||g||^2 g``; a skipped step hands on ``g``
  (``"plain"``) or ``g + alpha ||g|| g_v / (||g_v|| + eps)``.
  """

  def __init__(
    self,
    w,
    grad,
    *,
    lr,
    schedule="every",
    every=1,
    draws=None,
    threshold=0.0,
    delta=0.9,
    skipped="plain",
    alpha=0.7,
    **hyper,
  ):
    self.w, self.grad, self.lr, self.hyper = w, grad, lr, hyper
    self.schedule, self.every, self.draws = schedule, every, draws
    self.threshold, self.delta = threshold, delta
    self.skipped, self.alpha = skipped, alpha
    self.eps = hyper.get("eps", 1e-12)
    self.t, self.mu, self.var = 0, 0.0, 0.0
    self.g_v = {m: {n: np.zeros_like(v) for n, v in w[m].items()} for m in w}
    self.taken = []

  def _take(self, s):
    if self.t == 0:
      self.mu, self.var = s, 0.0
    else:
      self.mu = self.delta * self.mu + (1 - self.delta) * s
      self.var = self.delta * self.var + (1 - self.delta) * (s - self.mu) ** 2
    if self.schedule == "every":
      return self.t % self.every == 0
    if self.schedule == "random":
      return bool(self.draws[self.t])
    c = self.threshold(self.t) if callable(self.threshold) else self.threshold
    return s >= self.mu + c * np.sqrt(self.var)

  def step(self, batches):
    """One step on ``batches`` (a list of ``(x, y)``); returns the new params."""
    w = self.w
    g = _mean([self.grad(w, x, y) for x, y in batches])
    s = _dot(g, g)
    take = self._take(s)
    if take:
      _, out, _, _ = layer_sam_gradient(w, batches, self.grad, **self.hyper)
      if self.skipped == "orthogonal":
        proj = _dot(g, out) / s
        self.g_v = {m: {n: out[m][n] - proj * g[m][n] for n in w[m]} for m in w}
    elif self.skipped == "orthogonal":
      scale = self.alpha * np.sqrt(s) / (np.sqrt(_dot(self.g_v, self.g_v)) + self.eps)
      out = {m: {n: g[m][n] + scale * self.g_v[m][n] for n in w[m]} for m in w}
    else:
      out = g
    self.w = {m: {n: w[m][n] - self.lr * out[m][n] for n in w[m]} for m in w}
    self.taken.append(take)
    self.t += 1
    return self.w
