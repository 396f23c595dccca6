"""The cost of every optax_lgm transformation against its Optax peers.

Prints a markdown report and (with ``--json``) writes the figures as JSON.
Every figure is the median over interleaved rounds after compilation, as a
ratio to a baseline measured in the same run (see ``benchmarks/_timing.py``):

1. ``update``: one jitted ``tx.update`` (params given) on a ResNet-50-shaped
   tree (25.6M parameters, 161 leaves) and on a tree of about 1,000 leaves,
   against ``optax.scale_by_adam``;
2. ``compile``: trace + lower + compile of the same updates on the many-leaf
   tree, against ``optax.scale_by_adam``'s;
3. ``memory``: bytes of the optimizer state, against Adam's;
4. ``train``: a jitted training step of a ResNet-20 (batch 128, CIFAR-shaped)
   per optimizer, against SGD with momentum.

The device is named in the report; on a GPU machine the same command gives
the report there.

Run from the repository root: ``python -m benchmarks [--reps 20]
[--train-reps 5] [--compile-reps 1] [--sizes batch=64,leaves=500]
[--only update,memory] [--json out.json]``; ``--quick`` runs tiny sizes with
XLA's optimisations off (the smoke test: its figures mean nothing). Progress
goes to stderr, the report to stdout.
"""

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

import flax
import jax
import jaxlib
import optax

import optax_lgm
from benchmarks import report, train_step, update_cost

SECTIONS = ("update", "compile", "memory", "train")

DEFAULT_SIZES: dict[str, Any] = dict(
  resnet50_width=1.0,  # Channels of the ResNet-50 tree (1.0: 25.6M params)
  resnet50_depth=50,  # and its depth (14, 26, 50, 101 or 152).
  leaves=1000,  # Leaves of the many-leaf tree.
  leaf_dim=64,  # Width of its transformer blocks.
  batch=128,  # Train step: batch size,
  image=32,  # image side,
  depth=20,  # ResNet depth (6n + 2),
  width=16,  # and width.
)
QUICK_SIZES: dict[str, Any] = dict(
  resnet50_width=0.0625,
  resnet50_depth=14,
  leaves=21,
  leaf_dim=8,
  batch=4,
  image=8,
  depth=8,
  width=4,
)


def parse_sizes(text: str | None, base: dict[str, Any]) -> dict[str, Any]:
  """Applies ``key=value,...`` overrides to ``base``."""
  sizes = dict(base)
  if not text:
    return sizes
  for item in text.split(","):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or key not in sizes:
      raise SystemExit(
        f"--sizes takes key=value pairs with keys in {sorted(sizes)}, got {item!r}."
      )
    try:
      number = float(value)
    except ValueError:
      raise SystemExit(f"--sizes: {key} takes a number, got {value!r}.") from None
    sizes[key] = number if isinstance(base[key], float) else int(number)
  return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The command-line flags."""
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks", description=__doc__.splitlines()[0]
  )
  parser.add_argument(
    "--sizes",
    default=None,
    help="comma-separated key=value overrides of the sizes: "
    + ", ".join(f"{k}={v}" for k, v in DEFAULT_SIZES.items()),
  )
  parser.add_argument(
    "--reps",
    type=int,
    default=None,
    help="interleaved rounds of the update timings (20)",
  )
  parser.add_argument(
    "--train-reps",
    type=int,
    default=None,
    help="interleaved rounds of the train-step timing (5)",
  )
  parser.add_argument(
    "--compile-reps",
    type=int,
    default=None,
    help="interleaved rounds of the compile timing (1: compiles are slow)",
  )
  parser.add_argument("--json", default=None, metavar="PATH", help="write JSON here")
  parser.add_argument(
    "--quick", action="store_true", help="tiny sizes and few rounds (smoke test)"
  )
  parser.add_argument(
    "--only",
    default=",".join(SECTIONS),
    help=f"comma-separated sections to run, of {','.join(SECTIONS)}",
  )
  args = parser.parse_args(argv)
  args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
  unknown = set(args.sections) - set(SECTIONS)
  if unknown:
    parser.error(f"--only: unknown sections {sorted(unknown)}; choose from {SECTIONS}")
  args.sizes = parse_sizes(args.sizes, QUICK_SIZES if args.quick else DEFAULT_SIZES)
  if args.reps is None:
    args.reps = 3 if args.quick else 20
  if args.train_reps is None:
    args.train_reps = 2 if args.quick else 5
  if args.compile_reps is None:
    args.compile_reps = 1
  return args


def _progress(section: str):
  start = time.perf_counter()

  def say(message: str) -> None:
    print(
      f"[{section} {time.perf_counter() - start:6.1f}s] {message}",
      file=sys.stderr,
      flush=True,
    )

  return say


def _load() -> str:
  try:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())
  except OSError:
    return "n/a"


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Runs the selected sections; returns the results (JSON-ready)."""
  start, cpu_start = time.perf_counter(), time.process_time()
  device = jax.devices()[0]
  kind = getattr(device, "device_kind", device.platform)
  meta: dict[str, Any] = dict(
    device=f"{device.platform}: {kind}",
    device_count=jax.device_count(),
    gpu_note=(
      "No GPU in this run: section 5 (the same report on a GPU) needs a GPU "
      "machine; run the same command there."
      if device.platform == "cpu"
      else f"Section 5: this is the report on {kind}."
    ),
    cpu_count=os.cpu_count(),
    load_start=_load(),
    jax=jax.__version__,
    jaxlib=jaxlib.__version__,
    optax=optax.__version__,
    flax=flax.__version__,
    optax_lgm=optax_lgm.__version__,
    python=platform.python_version(),
    sizes=args.sizes,
    reps=args.reps,
    train_reps=args.train_reps,
    compile_reps=args.compile_reps,
    sections=args.sections,
    quick=args.quick,
  )
  results: dict[str, Any] = dict(meta=meta)
  # Where compile time is not the figure, compile on every core at once.
  workers = max(1, min(4, os.cpu_count() or 1))
  shapes = update_cost.tree_shapes(args.sizes)
  titles = update_cost.tree_titles(args.sizes)
  if "memory" in args.sections:
    results["memory"] = update_cost.run_memory(shapes, titles, _progress("memory"))
  if "update" in args.sections:
    results["update"] = {
      "resnet50": update_cost.run_tree(
        shapes["resnet50"],
        title=titles["resnet50"],
        reps=args.reps,
        compile_reps=1,
        workers=workers,
        progress=_progress("update/resnet50"),
      )
    }
  if "update" in args.sections or "compile" in args.sections:
    # One set of compilations serves both sections.
    many = update_cost.run_tree(
      shapes["many_leaves"],
      title=titles["many_leaves"],
      reps=args.reps,
      compile_reps=args.compile_reps if "compile" in args.sections else 1,
      progress=_progress("update+compile/many_leaves"),
      time_updates="update" in args.sections,
    )
    if "update" in args.sections:
      results["update"]["many_leaves"] = many
    if "compile" in args.sections:
      results["compile"] = many
  if "train" in args.sections:
    results["train"] = train_step.run(
      args.sizes,
      reps=args.train_reps,
      update_reps=args.reps,
      progress=_progress("train"),
      workers=workers,
    )
  results["targets"] = report.targets(results)
  meta["load_end"] = _load()
  meta["seconds"] = time.perf_counter() - start
  meta["cpu_seconds"] = time.process_time() - cpu_start
  return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the report, prints it and writes the JSON; returns the results."""
  args = parse_args(argv)
  previous = jax.config._read("jax_disable_most_optimizations")
  if args.quick:
    # A smoke test: compile fast; the figures then mean nothing.
    jax.config.update("jax_disable_most_optimizations", True)
  try:
    results = run(args)
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)
  print(report.render(results), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == "__main__":
  main()
