"""Time to a target accuracy, after AlgoPerf's rule, on a ResNet-20.

For each contender and seed, trains the ResNet-20 on the digits upscaled to
32x32x3 (`benchmarks._tasks`) through the example trainer's loop, evaluating
every ``--eval-every`` steps, and reports the time to target of
``examples.loop`` (compilation in, evaluations out; a seed that missed counts
as infinite in the median), the seeds that reached it, the steps to target, the
final accuracy (mean of the last three evaluations), the time per step and the
compilations. Each seed runs the contenders of `CONTENDERS` in a new random
order; every step is compiled with ``reshape-mover`` off, as the trainer does on
a CPU host.

Run: ``python -m benchmarks.time_to_target [--seeds 3 --json out.json]``.
"""

import math
import time
from typing import Any

import numpy as np
import optax

import optax_lgm
from benchmarks import _tasks
from benchmarks._tasks import SHARE_FORWARD, budget_mask
from examples import loop

OUTPUT_LAYERS = ("blocks/8/bn2", "head")
"""The start of the static contender: the ResNet-20's two output-side layers."""

CONTENDERS = (
  "sgd", "sam", "layer_sam dynamic", "layer_sam static", "layer_sam budget", "lgm",
  "dgs",
)  # fmt: skip
"""SGD (momentum 0.9), ``optax.contrib.sam`` (opaque, the same SGD), ``layer_sam``
dynamic, static through ``optax_lgm.StaticSelection`` (from `OUTPUT_LAYERS`) and
static among the layers of ``--budget``, ``lgm`` and ``dgs``."""


def make_optimizer(name: str, args) -> optax.GradientTransformation:
  """The contender ``name`` of `CONTENDERS`."""
  sgd = optax.sgd(args.lr, momentum=0.9)
  if name.startswith("layer_sam"):
    mask = budget_mask(args.budget) if name.endswith("budget") else None
    return optax_lgm.layer_sam(sgd, rho=args.rho, k=args.k, mask=mask)
  return {
    "sgd": sgd,
    "sam": _tasks.opaque_sam(sgd, args.rho),
    "lgm": optax_lgm.lgm(learning_rate=args.lr),
    "dgs": optax_lgm.dgs(learning_rate=args.dgs_lr),
  }[name]


def train(name: str, seed: int, args, train_data, test_data) -> dict[str, Any]:
  """One run; returns its curve, time to target and compilations."""
  task = _tasks.Task(train_data["image"], seed=seed)
  tx = make_optimizer(name, args)
  traces: list = []
  sam = name == "sam" or name.startswith("layer_sam")
  step = _tasks.jit_step(task, tx, sam=sam, traces=traces, options=SHARE_FORWARD)
  if name in ("layer_sam static", "layer_sam budget"):
    step = optax_lgm.StaticSelection(
      step, every=args.every, margin=args.margin,
      max_compilations=args.max_compilations, total_steps=args.steps,
      start=OUTPUT_LAYERS if name == "layer_sam static" else None,
    )  # fmt: skip

  _, metrics = _tasks.train_pure(
    task, tx, step, train_data, test_data, steps=args.steps, batch=args.batch,
    seed=seed + 1, eval_every=args.eval_every, target=args.target,
    stop_at_target=args.stop_at_target,
  )  # fmt: skip
  curve = metrics.data["curve"]
  # Accuracy at batch 16 is noisy from one evaluation to the next (BatchNorm):
  # the final accuracy is the mean of the last three evaluations.
  out = dict(
    seconds_to_target=metrics.data["time_to_target"],
    steps_to_target=metrics.data["steps_to_target"],
    final_accuracy=float(np.mean([c["test_accuracy"] for c in curve[-3:]])),
    train_seconds=metrics.data["train_seconds"], steps=curve[-1]["step"],
    compilations=len(traces), curve=curve,
  )  # fmt: skip
  if isinstance(step, optax_lgm.StaticSelection):
    out.update(step.log())
  return out


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
  """Per contender: the medians over seeds, and the figures of each seed."""
  rows = {}
  for name, results in runs.items():
    seconds = [r["seconds_to_target"] for r in results]
    steps = [r["steps_to_target"] for r in results]
    reached = [s for s in steps if s is not None]
    median = loop.median_time(seconds)
    per_step = [r["train_seconds"] / r["steps"] for r in results]
    rows[name] = dict(
      seconds=seconds, steps=steps,
      final_accuracy=[r["final_accuracy"] for r in results],
      compilations=[r["compilations"] for r in results],
      # AlgoPerf's rule: a seed that missed counts as infinite (None: the median is).
      median_seconds=None if math.isinf(median) else median,
      median_steps=float(np.median(reached)) if reached else None,
      seconds_per_step=float(np.median(per_step)),
    )  # fmt: skip
  return rows


def main(argv: list[str] | None = None) -> dict:
  parser = _tasks.parser(
    __doc__, contenders=",".join(CONTENDERS), seeds=3, steps=(400, "steps per run"),
    batch=16, eval_every=(20, "steps"), target=(0.97, "test accuracy"),
    lr=(0.05, "SGD-based contenders"), dgs_lr=(0.01, "dgs"), rho=0.05, k=2,
    every=(10, "StaticSelection"), margin=(0.05, "StaticSelection"),
    max_compilations=4, budget="blocks/8,head", stop_at_target=False, json=None,
  )  # fmt: skip
  args = parser.parse_args(argv)
  names = args.contenders.split(",")
  if unknown := [name for name in names if name not in CONTENDERS]:
    parser.error(f"unknown contender {unknown[0]!r}; expected some of {CONTENDERS}")
  train_data, test_data, _ = _tasks.digits(32)
  runs: dict[str, list[dict]] = {name: [] for name in names}
  order = np.random.default_rng(0)
  wall = time.perf_counter()
  for seed in range(args.seeds):
    for j in order.permutation(len(names)):
      r = train(names[j], seed, args, train_data, test_data)
      runs[names[j]].append(r)
      print(
        f"seed {seed} {names[j]}: target at {r['seconds_to_target']} s "
        f"(step {r['steps_to_target']}), final {r['final_accuracy']:.4f}, "
        f"{r['compilations']} compilations"
        + (f", changes {r['selection_changes']}" if "selection_changes" in r else ""),
        flush=True,
      )
  rows = summarize(runs)
  record = _tasks.record("benchmarks.time_to_target", argv)
  print(
    f"\nResNet-20, digits 32x32 ({len(train_data['label'])} train / "
    f"{len(test_data['label'])} test), batch {args.batch}, {args.steps} steps, "
    f"eval every {args.eval_every}, lr {args.lr} (dgs {args.dgs_lr}), "
    f"rho {args.rho}, k {args.k}, StaticSelection every {args.every} margin "
    f"{args.margin} max {args.max_compilations}, budget {args.budget}; "
    f"{args.seeds} seeds; {record['machine']}; "
    f"{time.perf_counter() - wall:.0f} s in all\n"
  )
  result = dict(
    **record, target=args.target, settings=vars(args), contenders=rows, runs=runs,
  )  # fmt: skip
  tables = loop.docs_script("make_tables")
  print(tables.markdown(tables.time_to_target_table(result)))
  _tasks.write_json(args.json, result)
  return result


if __name__ == "__main__":
  main()
