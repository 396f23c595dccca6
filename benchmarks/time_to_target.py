"""Time to a target accuracy, after AlgoPerf's rule, on a ResNet-20.

What a user pays for is the wall-clock time to reach an accuracy, compilation
included. For each contender and seed this benchmark trains the CIFAR-shaped
ResNet-20 of ``examples.models`` on the digits of ``benchmarks._tasks``
(upscaled to 32x32x3; the TFDS train/test split) for ``--steps`` steps through
the example trainer's loop (``examples.loop``), evaluates the test accuracy
every ``--eval-every`` steps, and reports

* **time to target**: the training wall-clock from the start of training to
  the first evaluation at or above ``--target``, compilation included,
  evaluation time excluded (``examples.loop.time_to_target``); the median over
  seeds, a seed that missed counting as infinite, and the number of
  seeds that reached the target;
* the steps to target, the final accuracy (the mean of the last three
  evaluations; mean ± std over seeds), the training time per step
  (compilation included) and the compilations.

The defaults (batch 16, 400 steps, target 97%) put the target after at
least 200 SGD steps (220 and 260 steps for two seeds), so that compilation
does not decide the result.

Contenders: SGD (momentum 0.9), ``optax.contrib.sam`` (opaque mode, the same
SGD), ``layer_sam`` in dynamic mode, ``layer_sam`` in static mode through
``optax_lgm.StaticSelection`` (starting from `OUTPUT_LAYERS`, compiling new
selections in the background), the same with a selection budget (candidates
restricted by ``mask`` to the output-side layers named by ``--budget``),
``lgm`` and ``dgs``. The seeds run one after another, each through every
contender in a new random order, so that a slow spell of a shared machine
does not fall on one contender. Every step is compiled with XLA's
``reshape-mover`` pass off, as the trainer's command line does on a CPU host.

Run: ``python -m benchmarks.time_to_target [--seeds 3 --json out.json]``.
"""

import argparse
import json
import math
import platform
import sys
import time
from typing import Any

import jax
import numpy as np
import optax

import optax_lgm
from benchmarks import _tasks
from benchmarks._tasks import SHARE_FORWARD, budget_mask, make_step
from examples import loop

OUTPUT_LAYERS = ("blocks/8/bn2", "head")
"""The start of the static contender: the ResNet-20's two output-side layers."""

CONTENDERS = (
  "sgd",
  "sam",
  "layer_sam dynamic",
  "layer_sam static",
  "layer_sam budget",
  "lgm",
  "dgs",
)


def make_optimizer(name: str, args) -> optax.GradientTransformation:
  sgd = optax.sgd(args.lr, momentum=0.9)
  if name == "sgd":
    return sgd
  if name == "sam":
    return optax.contrib.sam(
      sgd, optax.chain(optax.contrib.normalize(), optax.sgd(args.rho)), opaque_mode=True
    )
  if name.startswith("layer_sam"):
    mask = budget_mask(args.budget) if name.endswith("budget") else None
    return optax_lgm.layer_sam(sgd, rho=args.rho, k=args.k, mask=mask)
  if name == "lgm":
    return optax_lgm.lgm(learning_rate=args.lr)
  if name == "dgs":
    return optax_lgm.dgs(learning_rate=args.dgs_lr)
  raise ValueError(f"Unknown contender name={name!r}; expected one of {CONTENDERS}.")


def train(name: str, seed: int, args, train_data, test_data) -> dict[str, Any]:
  """One run; returns its curve, time to target and compilations."""
  task = _tasks.Task(train_data["image"], seed=seed)
  tx = make_optimizer(name, args)
  traces: list = []
  step = jax.jit(
    make_step(
      task, tx, sam=name == "sam" or name.startswith("layer_sam"), traces=traces
    ),
    static_argnames="selection",
    compiler_options=SHARE_FORWARD,  # As the trainer does on a CPU host.
  )
  helper = None
  if name in ("layer_sam static", "layer_sam budget"):
    helper = optax_lgm.StaticSelection(
      step,
      every=args.every,
      margin=args.margin,
      max_compilations=args.max_compilations,
      start=OUTPUT_LAYERS if name == "layer_sam static" else None,
      total_steps=args.steps,
    )
    step = helper

  _, metrics = _tasks.train_pure(
    task, tx, step, train_data, test_data, steps=args.steps, batch=args.batch,
    seed=seed + 1, eval_every=args.eval_every, target=args.target,
    stop_at_target=args.stop_at_target,
  )  # fmt: skip
  curve = metrics.data["curve"]
  out = {
    "seconds_to_target": metrics.data["time_to_target"],
    "steps_to_target": metrics.data["steps_to_target"],
    # Accuracy at batch 16 is noisy from one evaluation to the next (BatchNorm):
    # the final accuracy is the mean of the last three evaluations.
    "final_accuracy": float(np.mean([c["test_accuracy"] for c in curve[-3:]])),
    "train_seconds": metrics.data["train_seconds"],
    "steps": curve[-1]["step"],
    "compilations": len(traces),
    "curve": curve,
  }
  if helper is not None:
    out.update(helper.log())
  return out


def _median(values: list) -> float | None:
  values = [v for v in values if v is not None]
  return float(np.median(values)) if values else None


def summarize(runs: dict[str, list[dict]], args) -> dict[str, dict]:
  rows = {}
  for name, results in runs.items():
    seconds = [r["seconds_to_target"] for r in results]
    median = loop.median_time(seconds)
    rows[name] = {
      "seconds": seconds,
      "steps": [r["steps_to_target"] for r in results],
      "final_accuracy": [r["final_accuracy"] for r in results],
      "compilations": [r["compilations"] for r in results],
      # AlgoPerf's rule: a seed that missed counts as infinite (None: the
      # median is).
      "median_seconds": None if math.isinf(median) else median,
      "median_steps": _median([r["steps_to_target"] for r in results]),
      "seconds_per_step": float(
        np.median([r["train_seconds"] / r["steps"] for r in results])
      ),
    }
  return rows


def markdown(rows: dict[str, dict], args) -> str:
  sam = rows.get("sam", {}).get("median_seconds")
  lines = [
    f"| contender | time to {args.target:.0%} (median s) | × SAM | reached | "
    "steps to target (median) | final accuracy | compilations | s/step (all) |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for name, row in rows.items():
    med = row["median_seconds"]
    ratio = "—" if med is None or not sam else f"{med / sam:.2f}"
    reached = sum(s is not None for s in row["seconds"])
    acc = np.asarray(row["final_accuracy"]) * 100
    lines.append(
      f"| {name} | {'—' if med is None else f'{med:.1f}'} | {ratio} | "
      f"{reached}/{len(row['seconds'])} | "
      f"{'—' if row['median_steps'] is None else int(row['median_steps'])} | "
      f"{acc.mean():.1f} ± {acc.std():.1f} | {max(row['compilations'])} | "
      f"{row['seconds_per_step']:.3f} |"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--contenders", default=",".join(CONTENDERS))
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=400, help="steps per run")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--eval-every", type=int, default=20, help="steps")
  parser.add_argument("--target", type=float, default=0.97, help="test accuracy")
  parser.add_argument("--lr", type=float, default=0.05, help="SGD-based contenders")
  parser.add_argument("--dgs-lr", type=float, default=0.01, help="dgs")
  parser.add_argument("--rho", type=float, default=0.05)
  parser.add_argument("--k", type=int, default=2)
  parser.add_argument("--every", type=int, default=10, help="StaticSelection")
  parser.add_argument("--margin", type=float, default=0.05, help="StaticSelection")
  parser.add_argument("--max-compilations", type=int, default=4)
  parser.add_argument(
    "--budget",
    default="blocks/8,head",
    help="comma-separated layer-name prefixes a budgeted selection may perturb",
  )
  parser.add_argument("--stop-at-target", action="store_true")
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  names = args.contenders.split(",")
  for name in names:
    if name not in CONTENDERS:
      parser.error(f"unknown contender {name!r}; expected some of {CONTENDERS}")
  train_data, test_data, _ = _tasks.digits(32)
  runs: dict[str, list[dict]] = {name: [] for name in names}
  order = np.random.default_rng(0)
  wall = time.perf_counter()
  for seed in range(args.seeds):
    for j in order.permutation(len(names)):
      name = names[j]
      r = train(name, seed, args, train_data, test_data)
      runs[name].append(r)
      print(
        f"seed {seed} {name}: target at {r['seconds_to_target']} s "
        f"(step {r['steps_to_target']}), final {r['final_accuracy']:.4f}, "
        f"{r['compilations']} compilations"
        + (f", changes {r['selection_changes']}" if "selection_changes" in r else ""),
        flush=True,
      )
  rows = summarize(runs, args)
  machine = (
    f"{jax.devices()[0].device_kind} ({jax.device_count()} device), "
    f"{platform.processor() or platform.machine()}, jax {jax.__version__}"
  )
  argv = sys.argv[1:] if argv is None else argv
  command = "python -m benchmarks.time_to_target " + " ".join(argv)
  print(
    f"\nResNet-20, digits 32x32 ({len(train_data['label'])} train / "
    f"{len(test_data['label'])} "
    f"test), batch {args.batch}, {args.steps} steps, eval every {args.eval_every}, "
    f"lr {args.lr} (dgs {args.dgs_lr}), rho {args.rho}, k {args.k}, "
    f"StaticSelection every {args.every} margin {args.margin} max "
    f"{args.max_compilations}, budget {args.budget}; {args.seeds} seeds; {machine}; "
    f"{time.perf_counter() - wall:.0f} s in all\n"
  )
  print(markdown(rows, args))
  result = {
    "command": command.strip(),
    "machine": machine,
    "target": args.target,
    "settings": vars(args),
    "contenders": rows,
    "runs": runs,
  }
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
