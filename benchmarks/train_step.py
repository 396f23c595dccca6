"""Section 4: the cost of a whole training step on a ResNet-20, per optimizer.

The step (forward, backward, optimizer update, apply) is the one of
``benchmarks._tasks`` (as in the layer-SAM speed benchmark), on the CIFAR
ResNet of ``examples.models`` with BatchNorm, so that the SAM rows here and
there measure the same thing. Every optimizer is timed interleaved against
SGD with momentum 0.9; the SGD-based optimizers (``lgm``, ``dgs``, LARS, the
SAMs) use the same momentum, so a ratio is the price of the transformation.
"""

import functools
from collections.abc import Callable
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


def contenders(
  params: Any,
) -> dict[str, tuple[Callable[[], optax.GradientTransformation], bool, Any]]:
  """Name -> (optimizer factory, whether it needs ``grad_fn``, selection)."""
  sgd = optax.sgd(0.1, momentum=0.9)
  layer_sam = getattr(optax_lgm, "layer_sam", None)
  names = optax_lgm.layer_names(params, layers="module")
  out_side = _tasks.forward_order(names)[-K:]
  out_sel = tuple(sorted(names.index(n) for n in out_side))

  def need_layer_sam():
    if layer_sam is None:
      raise NotImplementedError("optax_lgm.layer_sam does not exist yet")
    return layer_sam(sgd, rho=RHO, k=K, layers="module")

  return {
    BASELINE: (lambda: sgd, False, None),
    "lgm": (lambda: optax_lgm.lgm(0.1, momentum=0.9), False, None),
    "dgs (global)": (lambda: optax_lgm.dgs(30.0, momentum=0.9), False, None),
    "Adam": (lambda: optax.adam(1e-3), False, None),
    "LARS": (lambda: optax.lars(0.1, momentum=0.9), False, None),
    "optax.contrib.sam": (
      lambda: optax.contrib.sam(
        sgd,
        optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
        opaque_mode=True,
      ),
      True,
      None,
    ),
    f"layer_sam dynamic (k={K})": (need_layer_sam, True, None),
    f"layer_sam static (output-side {K}: {', '.join(out_side)})": (
      need_layer_sam,
      True,
      out_sel,
    ),
  }


def _update_alone(
  task: _tasks.Task, txs: dict[str, Any], x, y, *, reps: int, workers: int, progress
) -> dict[str, Any]:
  """Times ``tx.update`` alone on the model's gradients, against SGD's."""
  params, stats = task.params, task.stats
  grads = jax.jit(jax.grad(lambda p: task.loss(p, stats, x, y)[0]))(params)
  makers = {
    name: update_cost.maker(tx, grads, tx.init(params), params)
    for name, tx in txs.items()
  }
  comp = _timing.compile_interleaved(
    makers,
    baseline=BASELINE,
    reps=1,
    workers=workers,
    progress=progress,
  )
  fns = {
    name: _timing.Stepper(c.compiled, grads, txs[name].init(params), params)
    for name, c in comp.items()
  }
  return _timing.interleaved(fns, baseline=BASELINE, reps=reps, progress=progress)


def run(
  sizes: dict[str, Any],
  *,
  reps: int,
  update_reps: int,
  progress,
  workers: int = 1,
) -> dict[str, Any]:
  """Compiles and times every optimizer's training step, interleaved.

  Args:
    sizes: the report's sizes (``batch``, ``image``, ``depth``, ``width``).
    reps: rounds of the interleaved step timing.
    update_reps: rounds of the interleaved timing of the updates alone.
    progress: a function that reports progress.
    workers: compile this many steps at once.

  Returns:
    A JSON-ready dict of the model's size and per optimizer the step's time,
    ratio to SGD, XLA's FLOP count and the compile time; for the optimizers
    that take no ``grad_fn``, also the time of ``tx.update`` alone and the
    step ratio it implies (``1 + (update - SGD's update) / SGD step``): a
    bound on the step ratio that the noise of whole steps cannot blur.
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
  rows: dict[str, Any] = {}
  makers, states, plain = {}, {}, {}
  for name, (factory, sam, selection) in contenders(params).items():
    try:
      tx = factory()
    except NotImplementedError as e:
      progress(f"skipping {name}: {e}")
      rows[name] = dict(skipped=str(e))
      continue
    states[name] = tx.init(params)
    rows[name] = dict(selection=None if selection is None else list(selection))
    if not sam:
      plain[name] = tx

    def make(tx=tx, sam=sam, selection=selection, state=states[name]):
      step = _tasks.make_step(task, tx, sam=sam)
      args = (params, stats, state, xs, ys)
      return functools.partial(step, selection=selection), args

    makers[name] = make
  comp = _timing.compile_interleaved(
    makers, baseline=BASELINE, reps=1, workers=workers, progress=progress
  )
  fns = {}
  for name, c in comp.items():
    rows[name]["compile_s"] = c.compile_s[0] + c.trace_lower_s[0]
    rows[name]["gflops"] = _tasks.cost_gflops(c.compiled)
    fns[name] = functools.partial(c.compiled, params, stats, states[name], xs, ys)
  timings = _timing.interleaved(
    fns, baseline=BASELINE, reps=reps, warmup=0, progress=progress
  )
  for name, t in timings.items():
    rows[name]["step"] = t.to_json()
  if BASELINE in plain:
    alone = _update_alone(
      task, plain, xs, ys, reps=update_reps, workers=workers, progress=progress
    )
    base_update = alone[BASELINE].median_s
    base_step = timings[BASELINE].median_s
    for name, t in alone.items():
      rows[name]["update_alone"] = t.to_json()
      rows[name]["step_bound"] = 1 + (t.median_s - base_update) / base_step
  num_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
  return dict(
    model=f"ResNet-{sizes['depth']} (width {sizes['width']})",
    params=num_params,
    batch=b,
    image=s,
    rows=rows,
  )
