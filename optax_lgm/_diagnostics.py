"""Per-layer diagnostics read from an optimizer state, by layer name."""

from typing import Any

import jax
import numpy as np


def _has_diagnostics(node: Any) -> bool:
  return hasattr(node, "diagnostics") and hasattr(node, "names")


def layer_stats(opt_state: Any) -> dict[str, dict[str, Any]]:
  """Returns the per-layer statistics found in an optimizer state.

  Every state of the library that keeps per-layer arrays (the α of
  :func:`optax_lgm.scale_by_lgm`, the gradient norms and selection counts of
  :func:`optax_lgm.layer_sam`) is found wherever it sits in the state (inside
  ``optax.chain``, ``inject_hyperparams``, ``MultiSteps``, an
  ``nnx.Optimizer``'s ``opt_state``...) and reported as
  ``{statistic: {layer_name: value}}`` of plain Python numbers, ready for
  ``json.dumps``. This is a host-side helper for logging: it transfers the
  arrays to the host. Where several such states are nested, the statistic
  names of all but the first are prefixed with their path in the state.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_lgm
    >>> params = {'a': jnp.ones(3), 'b': jnp.ones(2)}
    >>> tx = optax_lgm.scale_by_lgm()
    >>> state = tx.init(params)
    >>> _, state = tx.update({'a': jnp.arange(3.0), 'b': jnp.ones(2)}, state)
    >>> sorted(optax_lgm.layer_stats(state))
    ['lgm_alpha', 'lgm_scale']

  Args:
    opt_state: an optimizer state (any pytree).

  Returns:
    A dict of dicts of Python ``float`` or ``int``.

  Raises:
    ValueError: if ``opt_state`` holds no state of the library with per-layer
      statistics (an ``optax.sgd`` state, or params passed by mistake).
  """
  stats: dict[str, dict[str, Any]] = {}
  _collect(opt_state, (), stats)
  if not stats:
    raise ValueError(
      "layer_stats found no per-layer statistics in opt_state (a state of "
      "optax_lgm.scale_by_lgm, lgm, layer_sam or keep_top_k_layers), got an "
      f"object of type {type(opt_state).__name__}."
    )
  return stats


def _collect(tree: Any, prefix: tuple, stats: dict[str, dict[str, Any]]) -> None:
  """Adds the statistics of every diagnostic state in ``tree`` to ``stats``."""
  found = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_has_diagnostics)[0]
  for path, node in found:
    if not _has_diagnostics(node):
      continue
    path = prefix + tuple(path)
    for key, values in node.diagnostics().items():
      name = key if key not in stats else f"{jax.tree_util.keystr(path)}/{key}"
      values = np.asarray(jax.device_get(values))[: len(node.names)].tolist()
      stats[name] = dict(zip(node.names.names, values))
    # Wrapping states (layer_sam's inner optimizer) may hold more of them.
    _collect(tuple(node), path, stats)
