"""Cost of each transformation's ``update`` alone, its compile time and state.

Sections 1 to 3 of the report (``python -m benchmarks``), each against
``optax.scale_by_adam``:

1. **update**: ``jax.jit(tx.update)(grads, state, params)``, compiled, timed
   interleaved on a ResNet-50-shaped tree and on a tree of about 1,000 leaves;
2. **compile**: trace + lower + XLA compile of it on the many-leaf tree;
3. **memory**: bytes of ``tx.init(params)`` (from ``jax.eval_shape``).
"""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

import optax_lgm
from benchmarks import _timing, trees

BASELINE = "optax.scale_by_adam"

# Name -> factory. The first is the baseline; the last is a reference point:
# one elementwise pass (read the gradient, write the update), the least any
# transformation of the gradient can cost.
UPDATE_CONTENDERS: dict[str, Callable[[], optax.GradientTransformation]] = {
  BASELINE: optax.scale_by_adam,
  "scale_by_lgm (spatial)": lambda: optax_lgm.scale_by_lgm(variance="spatial"),
  "scale_by_lgm (temporal)": lambda: optax_lgm.scale_by_lgm(variance="temporal"),
  "scale_by_dgs (global)": lambda: optax_lgm.scale_by_dgs(reduction="global"),
  "scale_by_dgs (layer)": lambda: optax_lgm.scale_by_dgs(reduction="layer"),
  "scale_by_dgs (element)": lambda: optax_lgm.scale_by_dgs(reduction="element"),
  "keep_top_k_layers (k=2)": lambda: optax_lgm.keep_top_k_layers(2),
  "optax.scale_by_trust_ratio (LARS)": optax.scale_by_trust_ratio,
  "optax.scale_by_novograd": optax.scale_by_novograd,
  "optax.scale (one pass, reference)": lambda: optax.scale(-1.0),
}

# The memory section adds the variants whose state grows with the params.
MEMORY_CONTENDERS: dict[str, Callable[[], optax.GradientTransformation]] = {
  **UPDATE_CONTENDERS,
  "scale_by_dgs (global, importance EMA)": lambda: optax_lgm.scale_by_dgs(
    importance_decay=0.9
  ),
  "scale_by_lgm (spatial, layers='module')": lambda: optax_lgm.scale_by_lgm(
    layers="module"
  ),
}

# Targets of the issue: ratio to scale_by_adam at most this.
UPDATE_TARGETS = {"scale_by_lgm (spatial)": 0.6, "scale_by_dgs (global)": 0.6}
COMPILE_TARGET = 2.0


def report_trees(sizes: dict[str, Any]) -> dict[str, tuple[str, trees.Shapes]]:
  """The report's two trees: name -> (title, shapes)."""
  depth, width = sizes["resnet50_depth"], sizes["resnet50_width"]
  many = trees.many_leaves_shapes(sizes["leaves"], sizes["leaf_dim"])
  return {
    "resnet50": (f"ResNet-{depth}-shaped tree", trees.resnet50_shapes(width, depth)),
    "many_leaves": ("many-leaf tree (transformer blocks)", many),
  }


def updates_interleaved(
  txs: dict[str, Any], grads, params, *, reps: int, compile_reps: int = 1,
  workers: int = 1, progress, time_updates: bool = True, baseline: str = BASELINE,
) -> tuple[dict[str, _timing.CompileTiming], dict[str, _timing.Timing]]:  # fmt: skip
  """Compiles ``tx.update`` of each of ``txs``, then times the compiled updates.

  Both interleaved, against ``baseline``; the state is fed back from call to
  call. Without ``time_updates`` the timings are ``{}``. ``workers``:
  compilations at once (1 where compile time is a figure).
  """
  states = {name: tx.init(params) for name, tx in txs.items()}
  # The state is not donated: on XLA:CPU, donating Adam's state adds a copy
  # of both moments per leaf (13 instead of 9 passes over the tree), which
  # would flatter every other contender.
  comp = _timing.compile_interleaved(
    {name: (tx.update, (grads, states[name], params)) for name, tx in txs.items()},
    baseline=baseline, reps=compile_reps, workers=workers, progress=progress,
  )  # fmt: skip
  if not time_updates:
    return comp, {}

  def stepper(compiled, state):
    def call():
      nonlocal state
      updates, state = compiled(grads, state, params)
      return updates

    return call

  fns = {name: stepper(c.compiled, states[name]) for name, c in comp.items()}
  return comp, _timing.interleaved(fns, baseline=baseline, reps=reps, progress=progress)


def run_tree(
  title: str, shapes: trees.Shapes, *, reps: int, compile_reps: int,
  progress: Callable[[str], None], time_updates: bool = True, workers: int = 1,
) -> dict[str, Any]:  # fmt: skip
  """Compiles (and with ``time_updates`` times) every contender on one tree.

  Returns, JSON-ready, the tree's size and per contender its compile and update
  measurements (`updates_interleaved`).
  """
  params = trees.materialize(shapes, seed=0)
  grads = trees.materialize(shapes, seed=1, scale=1e-3)
  num_leaves, num_params = len(jax.tree.leaves(params)), optax.tree.size(params)
  txs = {name: factory() for name, factory in UPDATE_CONTENDERS.items()}
  comp, timings = updates_interleaved(
    txs, grads, params, reps=reps, compile_reps=compile_reps, workers=workers,
    progress=progress, time_updates=time_updates,
  )  # fmt: skip
  rows: dict[str, Any] = {}
  for name, c in comp.items():
    # Passes: bytes XLA reads and writes per call, in units of the tree's bytes.
    rows[name] = dict(compile=c.to_json(), passes=c.bytes_accessed / (4 * num_params))
    if name in timings:
      rows[name]["update"] = timings[name].to_json()
  return dict(title=title, leaves=num_leaves, params=num_params, rows=rows)


def state_bytes(tx: optax.GradientTransformation, params: Any) -> int:
  """Bytes of ``tx.init(params)``, from its abstract shape (nothing allocated)."""
  state = jax.eval_shape(tx.init, params)
  return int(sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)))


def run_memory(found: dict[str, tuple[str, trees.Shapes]]) -> dict[str, Any]:
  """Optimizer-state bytes of every contender on every tree of `report_trees`."""
  out = {}
  for tree_name, (title, shapes) in found.items():
    params = trees.abstract(shapes)
    num_leaves, num_params = len(jax.tree.leaves(params)), optax.tree.size(params)
    size = {name: state_bytes(f(), params) for name, f in MEMORY_CONTENDERS.items()}
    out[tree_name] = dict(
      title=title,
      leaves=num_leaves,
      params=num_params,
      layers=len(optax_lgm.layer_names(params)),
      modules=len(optax_lgm.layer_names(params, layers="module")),
      rows={name: dict(bytes=b, ratio=b / size[BASELINE]) for name, b in size.items()},
    )
  return out
