"""Compares the optimizers of `examples.train` over several seeds.

Trains every optimizer for ``--seeds`` seeds and prints a markdown table of the
results page's columns, mean ± std over seeds, and the cost (throughput,
compilation); writes ``OUT/results.json`` and the plots `PLOTS`. With
``--tune``, each optimizer first gets its own learning rate (and radius) by
`examples.tune` on a validation split of the training set; the seeds then run at
the chosen settings and are judged on the test set.

Run: ``python -m examples.compare [--optimizers sgd,lgm --seeds 3 --tune]``.
"""

import dataclasses
import json
import pathlib
import shlex
import statistics
import sys
import tempfile
import time
from typing import Any

from examples import distributed, loop, train, tune
from examples.config import Config, Parser, UsageError, with_defaults
from examples.optimizers import DEFAULT_RHOS, OPTIMIZERS

# The results page's tables and figures (docs/), here of one comparison.
make_figures = loop.docs_script("make_figures")
make_tables = loop.docs_script("make_tables")

PLOTS = ("learning_curves.png", "lgm_layer_scale.png", "layer_sam_selection.png")
"""The results page's figures (the last two only with lgm / layer_sam)."""


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
  """Per-optimizer summary over seeds of the results of `train_and_evaluate`."""
  summary = {}
  for name, results in runs.items():
    compiles = [r["compile"] for r in results]
    summary[name] = {
      "learning_rate": results[0]["config"]["learning_rate"],
      "rho": results[0]["config"]["rho"] if name in DEFAULT_RHOS else None,
      "test_accuracy": [r["final_test_accuracy"] for r in results],
      "steps_to_target": [r["steps_to_target"] for r in results],
      "time_to_target": [r["time_to_target"] for r in results],
      # Epochs after the first: without compilation.
      "images_per_s": [
        statistics.fmean(h["images_per_s"] for h in r["history"][1:] or r["history"])
        for r in results
      ],
      "compile_seconds": [c["critical_seconds"] for c in compiles],
      "background_compile_seconds": [c["background_seconds"] for c in compiles],
      "compilations": [c["compilations"] for c in compiles],
      "selection_changes": [
        len((r.get("layer_sam_static") or {}).get("selection_changes", []))
        for r in results
      ],
      "robustness": {
        k: [r["robustness"][k] for r in results] for k in results[0]["robustness"]
      },
    }
  return summary


def plot(results: dict[str, Any], out: pathlib.Path) -> list[str]:
  """Draws `PLOTS` (those that apply) of ``results``, saved as ``out/results.json``."""
  sha = make_figures.sha256(out / "results.json")
  names = dict(zip(("_curves", "_lgm", "_layer_sam"), PLOTS))
  figures = make_figures.figures_for("compare", results)
  for suffix, draw, _ in figures:
    draw(results, out / names[suffix], sha)
  return [str(out / names[suffix]) for suffix, _, _ in figures]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Command line: runs the comparison; returns what results.json holds, plus plots."""
  distributed.share_forward_passes()
  defaults = Config(epochs=10, eval_every=5, checkpoints=False)  # Thrown away.
  parser = Parser(__doc__.splitlines()[0], defaults, prog="python -m examples.compare")
  add = parser.add_argument
  names = ",".join(OPTIMIZERS)
  add("--optimizers", default=names, metavar="NAMES", help="comma-separated")
  add("--seeds", type=int, default=3, help="runs per optimizer (seeds 0, 1, ...)")
  add("--out", default="results", metavar="DIR", help="for results.json and plots")
  add = parser.add_argument_group("tuning (examples/tune.py)").add_argument
  about = "first tune each optimizer's learning rate (and rho) on --validation "
  add("--tune", action="store_true", help=about + "training examples (default 1/6)")
  add("--tune_points", type=int, default=4, help="the rates of the first grid")
  add("--tune_factor", type=float, default=3.0, help="ratio of neighbouring rates")
  arguments = sys.argv[1:] if argv is None else argv
  args = parser.parse_args(arguments)
  config, target = args.config, args.config.target_accuracy
  optimizers = [name for name in args.optimizers.split(",") if name]
  if unknown := [name for name in optimizers if name not in OPTIMIZERS]:
    parser.error(f"unknown optimizer {unknown[0]!r}; expected some of {OPTIMIZERS}")
  if args.tune and args.tune_points < 2:
    parser.error(f"--tune_points={args.tune_points} must be at least 2")
  if args.tune and not args.tune_factor > 1:
    parser.error(f"--tune_factor={args.tune_factor} must be above 1")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  start = time.perf_counter()
  runs: dict[str, list[dict]] = {}
  tuning: dict[str, dict] = {}

  def run(settings: Config) -> dict:  # In a work directory deleted after it.
    with tempfile.TemporaryDirectory(prefix=f"{settings.optimizer}_") as workdir:
      return train.train_and_evaluate(with_defaults(settings), workdir)

  try:
    if args.tune and not config.validation:
      examples = len(train.splits(config)[0]["label"])
      config = dataclasses.replace(config, validation=examples // 6)
    for name in optimizers:
      settings = dataclasses.replace(config, optimizer=name)
      if args.tune:
        tuning[name] = tune.tune(
          config, name, run, points=args.tune_points, factor=args.tune_factor
        )
        settings = dataclasses.replace(settings, **tuning[name]["chosen"])
      runs[name] = [
        run(dataclasses.replace(settings, seed=seed)) for seed in range(args.seeds)
      ]
  except UsageError as error:  # One line, no traceback.
    parser.exit(2, f"error: {error}\n")
  elapsed = time.perf_counter() - start

  settings = {**dataclasses.asdict(config), **vars(args), "target": target}
  del settings["config"]
  results: dict[str, Any] = {
    "command": shlex.join(["python", "-m", "examples.compare", *arguments]),
    "commit": loop.commit(),
    "args": settings,
    "seconds": elapsed,
  }
  length = f"{config.epochs} epochs"
  if config.max_steps:
    length = f"at most {config.epochs} epochs and {config.max_steps} steps"
  print(
    f"{config.dataset} / {config.model}, {length}, batch {config.batch_size}, "
    f"{args.seeds} seeds, PGD {config.pgd_steps} steps, {elapsed:.0f} s"
  )
  if args.tune:
    results["tuning"] = tuning
    results["tuning_table"] = make_tables.markdown(make_tables.tuning_table(results))
    results["tuning_seconds"] = tune.seconds_of(tuning)
    print(
      f"tuning on {config.validation} held-out training examples, "
      f"{results['tuning_seconds']:.0f} s of runs:\n{results['tuning_table']}\n"
      "at the chosen settings, on the test set (their programs were compiled "
      "by the tuning runs, so the compile seconds below are near 0):"
    )
  results["summary"] = summary = summarize(runs)
  robust = next(iter(summary.values()), {}).get("robustness", {})
  columns = {k: k for k in robust if k != "clean"}  # Each under its own name.
  table = make_tables.compare_table(results, columns, performance=True)
  results["table"] = make_tables.markdown(table)
  results["runs"] = runs
  print(results["table"])
  (out / "results.json").write_text(json.dumps(results, indent=2))
  results["plots"] = plot(results, out)
  print(f"wrote {out / 'results.json'} and {', '.join(results['plots'])}")
  return results


if __name__ == "__main__":
  main()
