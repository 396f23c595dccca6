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
  new = {
    m: {n: w[m][n] - lr * (g2 if take[j] else g_mean)[m][n] for n in w[m]}
    for j, m in enumerate(layers)
  }
  return new, norms, sel
