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

Every setting of `examples.config.Config` is a flag here too (``--help``);
the comparison's defaults are 10 epochs, an evaluation every 5 steps and no
checkpoints.

Run: ``python -m examples.compare [--optimizers sgd,lgm --seeds 3 --epochs 10
--out results]``.
"""

import dataclasses
import json
import os
import pathlib
import tempfile
import time
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from examples import distributed, loop, train  # noqa: E402
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
      f"{s['learning_rate']:g}",
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
  args = parser.parse_args(argv)
  config, target = args.config, args.config.target_accuracy
  optimizers = [name for name in args.optimizers.split(",") if name]
  for name in optimizers:
    if name not in OPTIMIZERS:
      parser.error(f"unknown optimizer {name!r}; expected some of {OPTIMIZERS}")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  start = time.perf_counter()
  runs: dict[str, list[dict]] = {}
  with tempfile.TemporaryDirectory() as workdirs:
    for name in optimizers:
      runs[name] = []
      for seed in range(args.seeds):
        run = with_learning_rate(dataclasses.replace(config, optimizer=name, seed=seed))
        workdir = os.path.join(workdirs, f"{name}_{seed}")
        try:
          runs[name].append(train.train_and_evaluate(run, workdir))
        except UsageError as error:  # One line, no traceback.
          parser.exit(2, f"error: {error}\n")
  elapsed = time.perf_counter() - start

  summary = summarize(runs, target)
  table = markdown_table(summary, target, args.seeds)
  print(
    f"{config.dataset} / {config.model}, {config.epochs} epochs, batch "
    f"{config.batch_size}, {args.seeds} seeds, PGD {config.pgd_steps} steps, "
    f"{elapsed:.0f} s"
  )
  print(table)
  settings = {**dataclasses.asdict(config), **vars(args), "target": target}
  del settings["config"]
  results = {
    "args": settings,
    "seconds": elapsed,
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
