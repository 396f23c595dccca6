"""Compares the optimizers of `examples.train` over several seeds.

Trains every optimizer (default: all of `examples.optimizers.OPTIMIZERS`) on one
dataset and model (default: digits, CNN) for several seeds, then prints a
markdown table of mean ± std over seeds: final test accuracy, steps to reach a
target test accuracy (evaluated every ``--eval_every`` steps and at the end of
every epoch), the time to that target (AlgoPerf's rule: training seconds from
the first step to the first evaluation at or above the target, compilation
included, evaluation excluded; the median over seeds, a seed that misses the
target counting as infinite, "—" when the median is), training throughput
(images/s, epochs after the first, so without compilation), and FGSM / PGD /
Gaussian-noise accuracies of the final models. Writes ``OUT/results.json`` and
PNG plots into ``OUT``:

* ``learning_curves.png``: test accuracy against step, per optimizer (mean
  over seeds);
* ``lgm_layer_scale.png``: LGM's per-layer scale at the end of each epoch
  (mean over the lgm seeds), if ``lgm`` is compared;
* ``layer_sam_selection.png``: how many steps each layer was selected by
  ``layer_sam`` (mean over seeds), if ``layer_sam`` is compared.

The defaults (3 seeds, 10 epochs of digits on the CNN, all 7 optimizers)
finish in a few minutes on 2 CPU cores.

With ``--tune``, each optimizer first gets its own learning rate (and
``sam`` and ``layer_sam`` their radius ``rho``) by the protocol of
`examples.tune`: a log grid judged on a validation split held out of the
training set (``--validation``, default a sixth of it), one seed per point;
the seeds then run at the chosen settings, on the rest of the training set,
and are judged on the test set. ``results.json`` then also holds the grids,
the choices and their table. The tuning runs compile each optimizer's
program, so the seeds' time to target includes no compilation.

Every setting of `examples.config.Config` is a flag here too (``--help``);
the comparison's defaults are 10 epochs, an evaluation every 5 steps and no
checkpoints.

Run: ``python -m examples.compare [--optimizers sgd,lgm --seeds 3 --epochs 10
--out results --tune]``.
"""

import dataclasses
import itertools
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from examples import distributed, loop, train, tune  # noqa: E402
from examples.config import Config, Parser, UsageError, with_learning_rate  # noqa: E402
from examples.optimizers import OPTIMIZERS  # noqa: E402

PLOTS = ("learning_curves.png", "lgm_layer_scale.png", "layer_sam_selection.png")
"""The file names of the plots (the last two only with lgm / layer_sam)."""


def _mean_std(values: list[float]) -> str:
  if not values:
    return "-"
  values = np.asarray(values, dtype=float)
  return f"{values.mean():.4g} ± {values.std():.2g}"


def summarize(runs: dict[str, list[dict]], target: float) -> dict[str, dict]:
  """Per-optimizer summary over seeds of the results of `train_and_evaluate`."""
  summary = {}
  for name, results in runs.items():
    seconds, reached = zip(*(loop.time_to_target(r["curve"], target) for r in results))
    throughput = [
      float(np.mean([h["images_per_s"] for h in r["history"][1:] or r["history"]]))
      for r in results
    ]
    robust_keys = list(results[0]["robustness"])
    summary[name] = {
      "learning_rate": results[0]["config"]["learning_rate"],
      "rho": results[0]["config"]["rho"] if name in tune.SAM_LIKE else None,
      "test_accuracy": [r["final_test_accuracy"] for r in results],
      "steps_to_target": list(reached),
      "time_to_target": list(seconds),
      "images_per_s": throughput,
      "compile_seconds": [r["compile"]["critical_seconds"] for r in results],
      "background_compile_seconds": [
        r["compile"]["background_seconds"] for r in results
      ],
      "compilations": [r["compile"]["compilations"] for r in results],
      "selection_changes": [
        len((r.get("layer_sam_static") or {}).get("selection_changes", []))
        for r in results
      ],
      "robustness": {k: [r["robustness"][k] for r in results] for k in robust_keys},
    }
  return summary


def markdown_table(summary: dict[str, dict], target: float, num_seeds: int) -> str:
  """The summary as a markdown table (mean ± std over seeds)."""
  robust_keys = list(next(iter(summary.values()))["robustness"]) if summary else []
  robust_keys = [k for k in robust_keys if k != "clean"]
  header = [
    "optimizer",
    "lr",
    "test acc",
    f"steps to {target:g} (runs)",
    f"seconds to {target:g} (median)",
    "images/s",
    "compile s, first seed (critical / background)",
    "compilations",
    "selection changes",
    *robust_keys,
  ]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, s in summary.items():
    reached = [x for x in s["steps_to_target"] if x is not None]
    row = [
      name,
      f"{s['learning_rate']:.3g}" + (f", rho {s['rho']:g}" if s.get("rho") else ""),
      _mean_std(s["test_accuracy"]),
      f"{_mean_std(reached)} ({len(reached)}/{num_seeds})",
      f"{loop.median_time(s['time_to_target']):.3g}".replace("inf", "—"),
      f"{np.mean(s['images_per_s']):.0f} ± {np.std(s['images_per_s']):.0f}",
      # The seeds run in one process: the later ones reuse the first's programs.
      f"{s['compile_seconds'][0]:.1f} / {s['background_compile_seconds'][0]:.1f}",
      f"{np.median(s['compilations']):g}",
      f"{np.median(s['selection_changes']):g}",
      *(_mean_std(s["robustness"][k]) for k in robust_keys),
    ]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def _mean_curve(results: list[dict]) -> tuple[np.ndarray, np.ndarray]:
  steps = sorted({p["step"] for r in results for p in r["curve"]})
  accs = [
    np.mean([p["test_accuracy"] for r in results for p in r["curve"] if p["step"] == s])
    for s in steps
  ]
  return np.asarray(steps), np.asarray(accs)


def plot(runs: dict[str, list[dict]], out: pathlib.Path, target: float) -> list[str]:
  """Writes the PNG plots (`PLOTS`, the last two where they apply); their paths."""
  figures = {name: plt.subplots(figsize=(7, 4.5)) for name in PLOTS}
  _, ax = figures["learning_curves.png"]
  for name, results in runs.items():
    ax.plot(*_mean_curve(results), label=name)
  ax.axhline(target, color="gray", linestyle=":", linewidth=1)
  ax.set(xlabel="step", ylabel="test accuracy", title="Test accuracy (mean over seeds)")
  ax.set_ylim(0, 1)
  ax.legend()
  if "lgm" in runs:
    _, ax = figures["lgm_layer_scale.png"]
    history = [r["history"] for r in runs["lgm"]]
    for layer in history[0][0]["layer_stats"].get("lgm_scale", {}):
      values = [
        np.mean([np.mean(h[i]["layer_stats"]["lgm_scale"][layer]) for h in history])
        for i in range(len(history[0]))
      ]
      ax.plot([e["epoch"] for e in history[0]], values, marker="o", label=layer)
    ax.set(xlabel="epoch", ylabel="LGM scale", yscale="log")
    ax.set_title("LGM per-layer scale (mean over seeds)")
    ax.legend(fontsize="small")
  if "layer_sam" in runs:
    _, ax = figures["layer_sam_selection.png"]
    counts = [
      r["history"][-1]["layer_stats"]["sam_selected_count"] for r in runs["layer_sam"]
    ]
    layers = list(counts[0])
    ax.bar(range(len(layers)), [np.mean([c[n] for c in counts]) for n in layers])
    ax.set_xticks(range(len(layers)), layers, rotation=30, ha="right")
    ax.set(ylabel="steps selected")
    ax.set_title("layer_sam: selection count per layer (mean over seeds)")
  written = []
  for name, (fig, ax) in figures.items():
    if ax.has_data():
      fig.tight_layout()
      fig.savefig(out / name, dpi=100)
      written.append(str(out / name))
    plt.close(fig)
  return written


def commit() -> str | None:
  """The git commit of this checkout (``None`` outside a git checkout)."""
  try:
    return subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], cwd=pathlib.Path(__file__).parent,
      capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
  except (OSError, subprocess.CalledProcessError):
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Command line: runs the comparison; returns what results.json holds, plus plots."""
  distributed.share_forward_passes()
  defaults = Config(epochs=10, eval_every=5, checkpoints=False)  # Thrown away.
  parser = Parser(__doc__.splitlines()[0], defaults, prog="python -m examples.compare")
  add = parser.add_argument
  add(
    "--optimizers",
    default=",".join(OPTIMIZERS),
    metavar="NAMES",
    help="comma-separated",
  )
  add("--seeds", type=int, default=3, help="runs per optimizer (seeds 0, 1, ...)")
  add(
    "--out",
    default="results",
    metavar="DIR",
    help="where results.json and the plots go",
  )
  group = parser.add_argument_group("tuning (examples/tune.py)")
  group.add_argument(
    "--tune", action="store_true",
    help="first tune each optimizer's learning rate (sam and layer_sam: and rho) "
    "on a validation split of the training set, then run the seeds at the "
    "chosen settings (default --validation: a sixth of the training set)",
  )  # fmt: skip
  group.add_argument(
    "--tune_points", type=int, default=4, help="the rates of the first grid"
  )
  group.add_argument(
    "--tune_factor", type=float, default=3.0, help="the ratio of neighbouring rates"
  )
  arguments = sys.argv[1:] if argv is None else argv
  args = parser.parse_args(arguments)
  config, target = args.config, args.config.target_accuracy
  optimizers = [name for name in args.optimizers.split(",") if name]
  for name in optimizers:
    if name not in OPTIMIZERS:
      parser.error(f"unknown optimizer {name!r}; expected some of {OPTIMIZERS}")
  if args.tune and args.tune_points < 2:
    parser.error(f"--tune_points={args.tune_points} must be at least 2")
  if args.tune and not args.tune_factor > 1:
    parser.error(f"--tune_factor={args.tune_factor} must be above 1")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  start = time.perf_counter()
  runs: dict[str, list[dict]] = {}
  tuning: dict[str, dict] = {}
  with tempfile.TemporaryDirectory() as workdirs:
    count = itertools.count()

    def run(settings: Config) -> dict:
      workdir = os.path.join(workdirs, f"{settings.optimizer}_{next(count)}")
      return train.train_and_evaluate(with_learning_rate(settings), workdir)

    try:
      if args.tune and not config.validation:
        examples = len(train.load_dataset(config.dataset, config.data_dir)[0]["label"])
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

  summary = summarize(runs, target)
  table = markdown_table(summary, target, args.seeds)
  length = f"{config.epochs} epochs"
  if config.max_steps:
    length = f"at most {config.epochs} epochs and {config.max_steps} steps"
  print(
    f"{config.dataset} / {config.model}, {length}, batch {config.batch_size}, "
    f"{args.seeds} seeds, PGD {config.pgd_steps} steps, {elapsed:.0f} s"
  )
  results: dict[str, Any] = {}
  if args.tune:
    results["tuning"] = tuning
    results["tuning_table"] = tune.markdown_table(tuning)
    results["tuning_seconds"] = tune.seconds_of(tuning)
    print(
      f"tuning on {config.validation} held-out training examples, "
      f"{results['tuning_seconds']:.0f} s of runs:"
    )
    print(results["tuning_table"])
    print(
      "at the chosen settings, on the test set (their programs were compiled "
      "by the tuning runs, so the compile seconds below are near 0):"
    )
  print(table)
  settings = {**dataclasses.asdict(config), **vars(args), "target": target}
  del settings["config"]
  results = {
    "command": shlex.join(["python", "-m", "examples.compare", *arguments]),
    "commit": commit(),
    "args": settings,
    "seconds": elapsed,
    **results,
    "summary": summary,
    "table": table,
    "runs": runs,
  }
  with open(out / "results.json", "w") as f:
    json.dump(results, f, indent=2)
  results["plots"] = plot(runs, out, target)
  print(f"wrote {out / 'results.json'} and {', '.join(results['plots'])}")
  return results


if __name__ == "__main__":
  main()
