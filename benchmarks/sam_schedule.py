"""Mean step time of SAM with fewer SAM steps (``layer_sam(every=...)``).

Times, in one process, interleaved (``benchmarks._timing``), the mean time of
one compiled training step of

* SGD (momentum 0.9), the baseline,
* SAM (``optax.contrib.sam``, opaque mode, the same SGD),
* SAM every 2 and every 5 steps: ``layer_sam`` with every layer selected and
  ``unselected="recompute"`` (SAM itself) and ``every=2`` / ``every=5``, the
  second pass under ``lax.cond``; one compiled step serves both kinds,
* the ``every=2`` step alone on a perturbed and on a skipped step (the same
  executable, fed a state whose count decides the branch),
* SAM every 2 and every 5 steps decided on the host ("(host)"): the same
  ``layer_sam``, its step jitted with ``perturb`` a static argument and the
  loop passing ``perturb=(i % every == 0)``, so that it alternates between
  two executables, the perturbed step and the skipped step, with no
  conditional,

on the CIFAR-shaped ResNet-20 and the CNN of ``examples.models`` (32x32x3
digits of ``benchmarks._tasks``). One timed call runs
``--steps-per-call`` steps (a multiple of 2 and 5, so that each call holds
whole cycles of both schedules) feeding the state back, and the figure is
the time per step. It prints the ratios to SGD and the targets of the
issue, for the conditional and for the host's decision: ``every=2`` at most
(SAM + SGD) / 2 + 5%, ``every=5`` at most 1.25x SGD.

On XLA:CPU (jax 0.10) the perturbed step of a convolutional network is
far slower inside the conditional than SAM's step: XLA:CPU rewrites
convolutions into the layouts of its fast (Eigen) kernels in the entry
computation only, so the weight-gradient convolutions of the second pass,
inside a branch, run as naive loops (a 3x3 weight-gradient convolution in a
``lax.cond`` branch measured about 100x slower than outside). The skipped
step costs about an SGD step. Networks of matrix products are not affected.
That is why the host variant exists: a loop that knows the schedule (a
deterministic ``schedule="every"``) compiles the perturbed step as SAM's
step, in the entry computation, at the price of a second program.

Run: ``python -m benchmarks.sam_schedule [--models resnet20,cnn --batch 128
--reps 5]``; ``--batch 16 --reps 2 --models cnn`` runs in well under a
minute.
"""

import argparse
import functools
import json
from collections.abc import Callable
from typing import Any

import jax
import optax

import optax_lgm
from benchmarks import _tasks, _timing
from examples import input_pipeline

RHO = 0.05
LR = 0.05
EVERY = (2, 5)
HOST = {f"SAM every={every} (host)": every for every in EVERY}  # Label -> every.


TASKS = ("resnet20", "cnn")


def optimizers() -> dict[str, tuple[optax.GradientTransformation, bool]]:
  """Contender name -> (transformation, whether it takes ``grad_fn``)."""
  sgd = optax.sgd(LR, momentum=0.9)
  sam = optax.contrib.sam(
    sgd, optax.chain(optax.contrib.normalize(), optax.sgd(RHO)), opaque_mode=True
  )
  out = {"SGD": (sgd, False), "SAM": (sam, True)}
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


class Steps:
  """``n`` steps of a compiled step per call, the state fed back.

  With ``fixed=True`` every call restarts from the same state (one kind of
  step, perturbed or skipped, timed alone). With ``every``, step ``i`` (counted
  over the calls) is passed ``perturb=(i % every == 0)``.
  """

  def __init__(
    self, step: Callable, carry: tuple, batch: tuple, n: int, fixed=False, every=None
  ):
    self.step, self.carry, self.batch, self.n, self.fixed = step, carry, batch, n, fixed
    self.every, self.i = every, 0

  def __call__(self) -> Any:
    carry = self.carry
    for _ in range(self.n):
      kwargs = {} if self.every is None else {"perturb": self.i % self.every == 0}
      *carry, _ = self.step(*carry, *self.batch, **kwargs)
      self.i += 0 if self.fixed else 1
    if not self.fixed:
      self.carry = tuple(carry)
    return carry


def measure(name: str, args) -> dict[str, Any]:
  """Times the contenders on one model; returns the JSON-ready results."""
  data = _tasks.digits(32)[0]
  task = _tasks.Task(data["image"], model=name)
  batch = tuple(input_pipeline.batch_at(data, args.batch, 0, 0).values())
  fns, skipped_state = {}, {}
  for label, (tx, sam) in optimizers().items():
    carry = (task.params, task.stats, tx.init(task.params))
    if label in HOST:
      step = host_step(task, tx)
      fns[label] = Steps(step, carry, batch, args.steps_per_call, every=HOST[label])
      continue
    step = jax.jit(_tasks.make_step(task, tx, sam=sam))
    fns[label] = Steps(step, carry, batch, args.steps_per_call)
    if label == "SAM every=2":
      perturbed = carry  # count 0: perturbed.
      skipped = step(*carry, *batch)[:3]  # count 1: skipped.
      skipped_state = {"perturbed": perturbed, "skipped": skipped}
      for kind, state in skipped_state.items():
        fns[f"every=2, {kind} step"] = Steps(step, state, batch, 1, fixed=True)
  timings = _timing.interleaved(
    fns,
    baseline="SGD",
    reps=args.reps,
    warmup=args.warmup,
    progress=(lambda m: print(f"  {name}: {m}", flush=True)) if args.verbose else None,
  )

  def steps(label: str) -> int:
    return 1 if label.startswith("every=2, ") else args.steps_per_call

  per_step = {label: t.median_s / steps(label) for label, t in timings.items()}
  ratios = {label: t.ratio for label, t in timings.items()}
  # The single-step rows are timed per call of one step: their ratio to SGD's
  # call of steps_per_call steps is rescaled to a per-step ratio.
  for label in ratios:
    if label.startswith("every=2, "):
      ratios[label] *= args.steps_per_call
  half = (ratios["SAM"] + 1.0) / 2  # (SAM + SGD) / 2, in SGD steps.
  targets = {}
  for how in ("", " (host)"):
    targets[f"every=2{how} <= (SAM + SGD) / 2 + 5%"] = (
      ratios[f"SAM every=2{how}"],
      1.05 * half,
    )
    targets[f"every=5{how} <= 1.25x SGD"] = (ratios[f"SAM every=5{how}"], 1.25)
  return {
    "per_step_s": per_step,
    "ratio_to_sgd": ratios,
    "targets": {
      k: {"value": v, "vs_half": v / half, "limit": lim, "met": bool(v <= lim)}
      for k, (v, lim) in targets.items()
    },
    "timings": {label: t.to_json() for label, t in timings.items()},
  }


def report(name: str, result: dict[str, Any]) -> None:
  print(f"\n### {name}\n")
  print("| contender | ms / step | x SGD |")
  print("|---|---|---|")
  for label, seconds in result["per_step_s"].items():
    ratio = result["ratio_to_sgd"][label]
    print(f"| {label} | {1e3 * seconds:.2f} | {ratio:.2f} |")
  print()
  for target, t in result["targets"].items():
    verdict = "met" if t["met"] else "missed"
    print(
      f"- {target}: {t['value']:.2f}x SGD, {t['vs_half']:.2f}x (SAM + SGD) / 2;"
      f" limit {t['limit']:.2f}x SGD: {verdict}"
    )


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="resnet20,cnn", help="of: resnet20, cnn")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--reps", type=int, default=5, help="interleaved rounds")
  parser.add_argument("--warmup", type=int, default=1, help="untimed calls each")
  parser.add_argument(
    "--steps-per-call", type=int, default=10, help="a multiple of 10 (2 and 5)"
  )
  parser.add_argument("--json", default=None, help="write the results here")
  parser.add_argument("--verbose", action="store_true", help="print each round")
  args = parser.parse_args(argv)
  args.models = args.models.split(",")
  unknown = [m for m in args.models if m not in TASKS]
  if unknown:
    parser.error(f"unknown --models {unknown}; choose from {sorted(TASKS)}")
  if args.steps_per_call < 1 or args.steps_per_call % 10:
    parser.error(
      f"--steps-per-call must be a multiple of 10, got {args.steps_per_call}"
    )
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
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
