"""Time to target through the trainer, as a user runs it: one fresh process a run.

Each run is ``python -m examples.train`` in a new process (so every run
compiles its programs, as a user's first run does), with the trainer's
defaults for each optimizer, batch 32, an evaluation every 20 steps, no
robustness and no checkpoints. The contenders run interleaved (seed by seed,
the order rotating), at the run lengths of `LENGTHS`, all at the same learning
rate, each at its optimizer's default radius. Time to target is the trainer's
(`examples.loop`); a run that misses the target counts as infinite in a
median. ``--cache`` also checks JAX's
persistent compilation cache; ``--optimizers`` also takes the contenders of
`CONTENDERS`; ``--dataset fashion_mnist`` runs the CNN on Fashion-MNIST.

Run: ``python -m benchmarks.trainer_time_to_target [--dataset digits]
[--models cnn,resnet20] [--lengths short,medium,long]
[--optimizers sgd,sam,layer_sam,sam_every2] [--seeds 3] [--out results.json]
[--cache]``.
"""

import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks import _tasks, _timing
from examples import loop

make_tables = loop.docs_script("make_tables")  # The results page's cells.

LENGTHS = {
  "digits": {
    "cnn": {
      "short": (0.05, 0.95, 5),
      "medium": (0.015, 0.95, 10),
      "long": (0.005, 0.97, 30),
    },
    "resnet20": {
      "short": (0.05, 0.95, 5),
      "medium": (0.001, 0.95, 10),
      "long": (0.0004, 0.95, 25),
    },
  },
  "fashion_mnist": {
    "cnn": {
      "short": (0.05, 0.74, 300),
      "medium": (0.05, 0.82, 600),
      "long": (0.015, 0.86, 1400),
    },
  },
}
"""Run lengths by dataset and model: (learning rate, target accuracy, length).

The length is epochs on digits and steps (``--max_steps``) on Fashion-MNIST.
SGD's steps to the target, seed 0: digits CNN 132, 264, 968; digits ResNet-20
100, 264, 572; Fashion-MNIST CNN 120, 280, 960.
"""

DATASET_FLAGS = {
  "digits": "--epochs {}",
  "fashion_mnist": "--dataset fashion_mnist --epochs 1 --max_steps {} "
  "--validation 1000 --evaluate_on validation",
}
"""Each dataset's flags: on Fashion-MNIST, accuracy on 1,000 held-out images."""


CONTENDERS = {
  "sam_every2": "sam --sam_every 2",
  "sam_every5": "sam --sam_every 5",
  "layer_sam_every5": "layer_sam --sam_every 5",
  "layer_sam_dynamic_every5": "layer_sam --layer_sam_mode dynamic --sam_every 5",
}
"""Contenders beyond the trainer's optimizers: name -> the optimizer and flags.

SAM's second pass every 2 or 5 steps, decided on the host; static ``layer_sam``
every 5 steps (under ``lax.cond``) and dynamic ``layer_sam`` every 5 steps.
"""

RUN_KEYS = (
  "time_to_target", "steps_to_target", "final_test_accuracy", "evaluated_on",
  "compile", "layer_sam_static", "train_seconds", "learning_rate", "rho",
)  # fmt: skip
"""What the JSON keeps of each run's metrics (``final_test_accuracy``: on the
split of ``evaluated_on``; ``rho``: each optimizer's own default radius)."""


def run(
  contender: str, dataset: str, model: str, seed: int, length: str, workdir: str,
  *flags: str,
) -> dict[str, Any]:  # fmt: skip
  """One training run in a new process; what its ``metrics.json`` holds."""
  optimizer, *more = CONTENDERS.get(contender, contender).split()
  learning_rate, target, size = LENGTHS[dataset][model][length]
  command = [
    sys.executable, "-m", "examples.train", "--optimizer", optimizer, *more,
    "--model", model, "--seed", str(seed), *DATASET_FLAGS[dataset].format(size).split(),
    "--learning_rate", f"{learning_rate:g}", "--target_accuracy", f"{target:g}",
    "--batch_size", "32", "--eval_every", "20",
    "--no_robustness", "--no_checkpoints", "--no_progress", "--workdir", workdir,
    *flags,
  ]  # fmt: skip
  subprocess.run(command, check=True, capture_output=True, text=True)
  metrics = json.loads((pathlib.Path(workdir) / "metrics.json").read_text())
  final = f"final_{metrics['evaluated_on']}_accuracy"
  return {**metrics, "final_test_accuracy": metrics[final]}


def summarize(runs: list[dict[str, Any]], optimizers: list[str]) -> dict[str, Any]:
  """Per contender: median time to target, final accuracy, compilation."""
  summary = {}
  for name in optimizers:
    mine = [r for r in runs if r["optimizer"] == name]
    summary[name] = {
      "time_to_target": [r["time_to_target"] for r in mine],
      "median_time_to_target": loop.median_time([r["time_to_target"] for r in mine]),
      "steps_to_target": [r["steps_to_target"] for r in mine],
      "final_test_accuracy": [r["final_test_accuracy"] for r in mine],
      "compile_critical_s": [r["compile"]["critical_seconds"] for r in mine],
      "compile_background_s": [r["compile"]["background_seconds"] for r in mine],
      "compilations": [r["compile"]["compilations"] for r in mine],
      "selection_changes": [
        (r.get("layer_sam_static") or {}).get("selection_changes", []) for r in mine
      ],
    }
  return summary


def targets(results: dict[str, Any]) -> list[str]:
  """The issues' targets, each with the figure that decides it.

  ``layer_sam`` against SAM: at most 0.85 of its time; the time-sparse
  contenders of `CONTENDERS`: at most 0.7. Both with a final accuracy
  within (or above) SAM's seed spread.
  """
  lines = []
  for key, summary in results["summaries"].items():
    if "sam" not in summary:
      continue
    sam = summary["sam"]
    for name, limit in (("layer_sam", 0.85), *((c, 0.7) for c in CONTENDERS)):
      if name not in summary:
        continue
      mine = summary[name]
      ratio = mine["median_time_to_target"] / sam["median_time_to_target"]
      acc, sam_acc = np.mean(mine["final_test_accuracy"]), sam["final_test_accuracy"]
      within = acc >= min(sam_acc)  # Within SAM's seed spread, or above it.
      lines.append(
        f"{key}: {name} / SAM time to target {ratio:.2f} "
        f"({'meets' if ratio <= limit else 'misses'} <= {limit}); final accuracy "
        f"{acc:.4f} against SAM's {min(sam_acc):.4f}..{max(sam_acc):.4f} "
        f"({'within or above' if within else 'below'} SAM's seed spread)"
      )
  return lines


def cache_check(model: str, optimizers: list[str]) -> dict[str, Any]:
  """Each contender twice in a fresh persistent cache: compile seconds."""
  found = {}
  with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as work:
    for name in optimizers:
      seconds = []
      for attempt in range(2):
        workdir = os.path.join(work, f"{name}_{attempt}")
        result = run(
          name, "digits", model, 0, "short", workdir, "--compilation_cache", cache
        )
        seconds.append(result["compile"]["critical_seconds"])
      found[name] = {"first_s": seconds[0], "rerun_s": seconds[1]}
    found["cache_files"] = len(os.listdir(cache))
  return found


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the measurement and prints the table and the targets."""
  args = _tasks.parser(
    __doc__, models="cnn,resnet20", lengths="short,medium,long",
    optimizers="sgd,sam,layer_sam", seeds=3, cache=(False, "check the cache too"),
    out=(None, "write the results as JSON"),
    machine=(platform.platform(), "for the record"), dataset=sorted(LENGTHS),
  ).parse_args(argv)  # fmt: skip
  optimizers = args.optimizers.split(",")
  began = time.perf_counter()
  results: dict[str, Any] = {
    **_tasks.record("benchmarks.trainer_time_to_target", argv),
    "machine": args.machine, "dataset": args.dataset,
    "lengths": LENGTHS[args.dataset], "runs": [], "summaries": {},
  }  # fmt: skip
  with tempfile.TemporaryDirectory() as work:
    for model in args.models.split(","):
      for length in args.lengths.split(","):
        first = len(results["runs"])
        for seed, order in enumerate(_timing.rounds(optimizers, args.seeds)):
          for name in order:
            workdir = os.path.join(work, f"{model}_{length}_{name}_{seed}")
            metrics = run(
              name, args.dataset, model, seed, length, workdir,
              "--compilation_cache", "",
            )  # fmt: skip
            entry = {
              "dataset": args.dataset, "model": model, "length": length,
              "optimizer": name, "seed": seed, **{k: metrics.get(k) for k in RUN_KEYS},
            }  # fmt: skip
            results["runs"].append(entry)
            _tasks.write_json(args.out, results, indent=1)  # Kept if it stops early.
            print(
              f"{model} {length} {name} seed {seed}: {entry['time_to_target']} s "
              f"(step {entry['steps_to_target']})", file=sys.stderr, flush=True,
            )  # fmt: skip
        runs = results["runs"][first:]
        results["summaries"][f"{model}/{length}"] = summarize(runs, optimizers)
    if args.cache:
      results["cache"] = cache_check(args.models.split(",")[-1], optimizers)
  results["wall_seconds"] = time.perf_counter() - began
  print(make_tables.markdown(make_tables.trainer_time_to_target_table(results)))
  print("\n".join(targets(results)))
  if "cache" in results:
    print("persistent cache (compile seconds, first run / rerun):", results["cache"])
  print(f"wall-clock: {results['wall_seconds']:.0f} s")
  _tasks.write_json(args.out, results, indent=1)
  return results


if __name__ == "__main__":
  main()
