"""Mean step time of SAM with fewer SAM steps (``layer_sam(every=...)``).

Times, interleaved (`benchmarks._timing`), one compiled training step of SGD
(momentum 0.9, the baseline), SAM (``optax.contrib.sam``, opaque, the same SGD),
and SAM every 2 and every 5 steps: ``layer_sam`` with every layer selected and
``every=2`` / ``every=5``, either under ``lax.cond`` in one program (the
``every=2`` step also timed alone, perturbed and skipped) or decided on the
host, "(host)": ``perturb`` static, two programs. The models are the ResNet-20
and the CNN on the 32x32x3 digits of `benchmarks._tasks`; one timed call runs
``--steps-per-call`` steps, the state fed back. It prints the ratios to SGD
and the targets: ``every=2`` at most (SAM + SGD) / 2 + 5%, ``every=5`` at most
1.25x SGD.

Run: ``python -m benchmarks.sam_schedule [--models resnet20,cnn --batch 128
--reps 5]``; ``--batch 16 --reps 2 --models cnn`` takes under a minute.
"""

import functools
import itertools
from collections.abc import Callable
from typing import Any

import jax
import optax

import optax_lgm
from benchmarks import _tasks, _timing
from examples import input_pipeline, loop

RHO = 0.05
LR = 0.05
EVERY = (2, 5)
HOST = {f"SAM every={every} (host)": every for every in EVERY}  # Label -> every.
TASKS = ("resnet20", "cnn")


def optimizers() -> dict[str, tuple[optax.GradientTransformation, bool]]:
  """Contender name -> (transformation, whether it takes ``grad_fn``)."""
  sgd = optax.sgd(LR, momentum=0.9)
  out = {"SGD": (sgd, False), "SAM": (_tasks.opaque_sam(sgd, RHO), True)}
  for every in EVERY:
    tx = optax_lgm.layer_sam(sgd, RHO, k=None, unselected="recompute", every=every)
    out[f"SAM every={every}"] = (tx, True)
    out[f"SAM every={every} (host)"] = (tx, True)
  return out


def host_step(task: _tasks.Task, tx: optax.GradientTransformationExtraArgs):
  """The training step with ``perturb`` static: one program for each value."""

  def step(params, stats, opt_state, x, y, *, perturb: bool):
    update = functools.partial(tx.update, perturb=perturb)
    fixed = optax.GradientTransformationExtraArgs(tx.init, update)
    return _tasks.make_step(task, fixed, sam=True)(params, stats, opt_state, x, y)

  return jax.jit(step, static_argnames="perturb")


def repeat(step: Callable, carry: tuple, batch: tuple, n: int, every=None) -> Callable:
  """A call of ``n`` steps from ``carry``, the state fed back; with ``every``,
  step ``i`` (counted over the calls) is passed ``perturb=(i % every == 0)``."""
  count = itertools.count()

  def call() -> tuple:
    nonlocal carry
    for _ in range(n):
      kwargs = {} if every is None else {"perturb": next(count) % every == 0}
      *carry, _ = step(*carry, *batch, **kwargs)
    return carry

  return call


def measure(name: str, args) -> dict[str, Any]:
  """Times the contenders on one model; returns the JSON-ready results."""
  data = _tasks.digits(32)[0]
  task = _tasks.Task(data["image"], model=name)
  batch = tuple(input_pipeline.batch_at(data, args.batch, 0, 0).values())
  fns, steps = {}, {}
  for label, (tx, sam) in optimizers().items():
    carry = (task.params, task.stats, tx.init(task.params))
    if label in HOST:
      step = host_step(task, tx)
      fns[label] = repeat(step, carry, batch, args.steps_per_call, HOST[label])
      continue
    step = _tasks.jit_step(task, tx, sam=sam)
    fns[label] = repeat(step, carry, batch, args.steps_per_call)
    if label == "SAM every=2":  # At count 0 the step is perturbed, at 1 skipped.
      states = {"perturbed": carry, "skipped": step(*carry, *batch)[:3]}
      for kind, state in states.items():  # One step, always from this state.
        fns[f"every=2, {kind} step"] = functools.partial(step, *state, *batch)
        steps[f"every=2, {kind} step"] = 1
  timings = _timing.interleaved(
    fns, baseline="SGD", reps=args.reps, warmup=args.warmup,
    progress=(lambda m: print(f"  {name}: {m}", flush=True)) if args.verbose else None,
  )  # fmt: skip
  steps = {label: steps.get(label, args.steps_per_call) for label in timings}
  per_step = {label: t.median_s / steps[label] for label, t in timings.items()}
  # The single-step rows are timed against SGD's call of steps_per_call steps:
  # their ratio is rescaled to a per-step ratio.
  ratios = {
    label: t.ratio * (args.steps_per_call // steps[label])
    for label, t in timings.items()
  }
  half = (ratios["SAM"] + 1.0) / 2  # (SAM + SGD) / 2, in SGD steps.

  def target(value: float, limit: float) -> dict[str, Any]:
    met = bool(value <= limit)
    return {"value": value, "vs_half": value / half, "limit": limit, "met": met}

  targets = {}
  for how in ("", " (host)"):
    targets[f"every=2{how} <= (SAM + SGD) / 2 + 5%"] = target(
      ratios[f"SAM every=2{how}"], 1.05 * half
    )
    targets[f"every=5{how} <= 1.25x SGD"] = target(ratios[f"SAM every=5{how}"], 1.25)
  return {
    "per_step_s": per_step,
    "ratio_to_sgd": ratios,
    "targets": targets,
    "timings": {label: t.to_json() for label, t in timings.items()},
  }


def report(name: str, result: dict[str, Any]) -> None:
  tables = loop.docs_script("make_tables")
  [(_, table)] = tables.sam_schedule_tables({"results": {name: result}})
  print(f"\n### {name}\n\n{tables.markdown(table)}\n")
  for target, t in result["targets"].items():
    print(
      f"- {target}: {t['value']:.2f}x SGD, {t['vs_half']:.2f}x (SAM + SGD) / 2;"
      f" limit {t['limit']:.2f}x SGD: {'met' if t['met'] else 'missed'}"
    )


def parse_args(argv=None):
  parser = _tasks.parser(
    __doc__, models=("resnet20,cnn", "of: resnet20, cnn"), batch=128,
    reps=(5, "interleaved rounds"), warmup=(1, "untimed calls each"),
    steps_per_call=(10, "a multiple of 10 (2 and 5)"), json=None,
    verbose=(False, "print each round"),
  )  # fmt: skip
  args = parser.parse_args(argv)
  args.models = args.models.split(",")
  if unknown := [m for m in args.models if m not in TASKS]:
    parser.error(f"unknown --models {unknown}; choose from {sorted(TASKS)}")
  if (n := args.steps_per_call) < 1 or n % 10:
    parser.error(f"--steps-per-call must be a multiple of 10, got {n}")
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  print(
    f"Device: {jax.devices()[0].device_kind}; batch {args.batch}; "
    f"{args.reps} rounds of {args.steps_per_call} steps per contender."
  )
  results = {}
  for name in args.models:
    results[name] = measure(name, args)
    report(name, results[name])
  record = _tasks.record("benchmarks.sam_schedule", argv)
  _tasks.write_json(args.json, {**record, "args": vars(args), "results": results}, 1)


if __name__ == "__main__":
  main()
