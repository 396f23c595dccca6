"""Section 4 of the report: a whole training step on a ResNet, per optimizer.

The step (forward, backward, optimizer update, apply) is ``benchmarks._tasks``'s,
as in the layer-SAM speed benchmark, on the CIFAR ResNet of ``examples.models``
with BatchNorm. Every optimizer is timed interleaved against SGD with momentum
0.9; the SGD-based ones (``lgm``, ``dgs``, LARS, the SAMs) use the same
momentum, so a ratio is the price of the transformation.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_lgm
from benchmarks import _tasks, _timing, update_cost
from examples import models

BASELINE = "SGD (momentum 0.9)"
RHO = 0.05
K = 2
TARGETS = {"lgm": 1.03, "dgs (global)": 1.03}


def contenders(params: Any) -> dict[str, tuple[Any, bool, Any]]:
  """Name -> (optimizer, whether it needs ``grad_fn``, static selection)."""
  sgd = optax.sgd(0.1, momentum=0.9)
  names = optax_lgm.layer_names(params, layers="module")
  out_side, out_sel = _tasks.output_side(names, K)
  layer_sam = optax_lgm.layer_sam(sgd, rho=RHO, k=K, layers="module")
  static = f"layer_sam static (output-side {K}: {', '.join(out_side)})"
  return {
    BASELINE: (sgd, False, None),
    "lgm": (optax_lgm.lgm(0.1, momentum=0.9), False, None),
    "dgs (global)": (optax_lgm.dgs(30.0, momentum=0.9), False, None),
    "Adam": (optax.adam(1e-3), False, None),
    "LARS": (optax.lars(0.1, momentum=0.9), False, None),
    "optax.contrib.sam": (_tasks.opaque_sam(sgd, RHO), True, None),
    f"layer_sam dynamic (k={K})": (layer_sam, True, None),
    static: (layer_sam, True, out_sel),
  }


def run(
  sizes: dict[str, Any], *, reps: int, update_reps: int, progress, workers: int = 1
) -> dict[str, Any]:
  """Compiles and times every optimizer's training step, interleaved.

  ``sizes`` are the report's (``batch``, ``image``, ``depth``, ``width``);
  ``reps`` and ``update_reps`` are the rounds of the step timing and of the
  update alone; ``workers`` steps compile at once. Returns, JSON-ready, the
  model's size and the rows of section 4 (`benchmarks.report.train_section`
  says what each figure is).
  """
  rng = np.random.default_rng(0)
  b, s = sizes["batch"], sizes["image"]
  # Timing does not depend on the pixel values: uniform noise on [0, 1].
  x = rng.uniform(size=(b, s, s, 3)).astype(np.float32)
  y = rng.integers(0, 10, size=b).astype(np.int32)
  resnet = functools.partial(models.ResNet, depth=sizes["depth"], width=sizes["width"])
  task = _tasks.Task(x, model=resnet)
  params, stats = task.params, task.stats
  xs, ys = jnp.asarray(x), jnp.asarray(y)
  optimizers = contenders(params)
  comp, fns = _tasks.compile_steps(
    task, optimizers, params, stats, (xs, ys), baseline=BASELINE, workers=workers,
    progress=progress,
  )  # fmt: skip
  rows = {}
  for name, c in comp.items():
    selection = optimizers[name][2]
    rows[name] = dict(
      selection=None if selection is None else list(selection),
      compile_s=c.compile_s[0] + c.trace_lower_s[0],
      gflops=_timing.cost(c.compiled, "flops") / 1e9,
    )
  timings = _timing.interleaved(
    fns, baseline=BASELINE, reps=reps, warmup=0, progress=progress
  )
  for name, t in timings.items():
    rows[name]["step"] = t.to_json()
  # The update alone, on the model's gradients, of the optimizers without grad_fn.
  grads = jax.jit(jax.grad(lambda p: task.loss(p, stats, xs, ys)[0]))(params)
  plain = {name: tx for name, (tx, sam, _) in optimizers.items() if not sam}
  _, alone = update_cost.updates_interleaved(
    plain, grads, params, reps=update_reps, workers=workers, progress=progress,
    baseline=BASELINE,
  )  # fmt: skip
  base_update, base_step = alone[BASELINE].median_s, timings[BASELINE].median_s
  for name, t in alone.items():
    rows[name]["update_alone"] = t.to_json()
    rows[name]["step_bound"] = 1 + (t.median_s - base_update) / base_step
  return dict(
    model=f"ResNet-{sizes['depth']} (width {sizes['width']})",
    params=optax.tree.size(params),
    batch=b,
    image=s,
    rows=rows,
  )
