"""The cost of every optax_lgm transformation against its Optax peers.

Prints a markdown report (`benchmarks.report`) of four sections, each a ratio
to a baseline timed in the same run (`benchmarks._timing`): ``update`` and
``compile`` (`benchmarks.update_cost`), ``memory``, and ``train``
(`benchmarks.train_step`). ``--quick`` runs tiny sizes with XLA's optimisations
off (a smoke test: its figures mean nothing). Progress goes to stderr.

Run from the repository root: ``python -m benchmarks [--reps 20]
[--sizes batch=64,leaves=500] [--only update,memory] [--json out.json]``.
"""

import argparse
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
from benchmarks import _tasks, report, train_step, update_cost

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
  resnet50_width=0.0625, resnet50_depth=14, leaves=21, leaf_dim=8,
  batch=4, image=8, depth=8, width=4,
)  # fmt: skip


def parse_sizes(text: str | None, base: dict[str, Any]) -> dict[str, Any]:
  """Applies ``key=value,...`` overrides to ``base``."""
  sizes = dict(base)
  for item in text.split(",") if text else []:
    key, _, value = (part.strip() for part in item.partition("="))
    try:
      sizes[key] = type(base[key])(float(value))  # int sizes stay ints.
    except (KeyError, ValueError):
      message = f"--sizes: {item!r} is not key=number with a key in {', '.join(sizes)}"
      raise SystemExit(message) from None
  return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The command-line flags."""
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks", description=__doc__.splitlines()[0]
  )
  add = parser.add_argument
  sizes = ", ".join(f"{k}={v}" for k, v in DEFAULT_SIZES.items())
  add("--sizes", help=f"comma-separated key=value overrides of the sizes: {sizes}")
  add("--reps", type=int, help="interleaved rounds of the update timings (20)")
  add("--train-reps", type=int, help="interleaved rounds of the train step (5)")
  add("--compile-reps", type=int, default=1, help="rounds of the compile timing")
  add("--json", metavar="PATH", help="write JSON here")
  add("--quick", action="store_true", help="tiny sizes and few rounds (smoke test)")
  add("--only", default=",".join(SECTIONS), help=f"sections, of {','.join(SECTIONS)}")
  args = parser.parse_args(argv)
  args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
  if unknown := set(args.sections) - set(SECTIONS):
    parser.error(f"--only: unknown sections {sorted(unknown)}; choose from {SECTIONS}")
  args.sizes = parse_sizes(args.sizes, QUICK_SIZES if args.quick else DEFAULT_SIZES)
  if args.reps is None:
    args.reps = 3 if args.quick else 20
  if args.train_reps is None:
    args.train_reps = 2 if args.quick else 5
  return args


def _progress(section: str):
  start = time.perf_counter()

  def say(message: str) -> None:
    seconds = time.perf_counter() - start
    print(f"[{section} {seconds:6.1f}s] {message}", file=sys.stderr, flush=True)

  return say


def _load() -> str:
  try:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())
  except OSError:
    return "n/a"


def run(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
  """Runs the selected sections; returns the results (JSON-ready)."""
  start, cpu_start = time.perf_counter(), time.process_time()
  device = jax.devices()[0]
  kind = getattr(device, "device_kind", device.platform)
  gpu_note = f"Section 5: this is the report on {kind}."
  if device.platform == "cpu":
    gpu_note = (
      "No GPU in this run: section 5 (the same report on a GPU) needs a GPU "
      "machine; run the same command there."
    )
  versions = {m.__name__: m.__version__ for m in (jax, jaxlib, optax, flax, optax_lgm)}
  settings = ("sizes", "reps", "train_reps", "compile_reps", "sections", "quick")
  meta: dict[str, Any] = {
    "device": f"{device.platform}: {kind}",
    "device_count": jax.device_count(),
    "gpu_note": gpu_note,
    "cpu_count": os.cpu_count(),
    "load_start": _load(),
    **versions,
    "python": platform.python_version(),
    **{key: getattr(args, key) for key in settings},
  }
  results: dict[str, Any] = dict(**_tasks.record("benchmarks", argv), meta=meta)
  # Where compile time is not the figure, compile on every core at once.
  workers = max(1, min(4, os.cpu_count() or 1))
  found = update_cost.report_trees(args.sizes)

  def tree(name: str, section: str, **kwargs) -> dict[str, Any]:
    progress = _progress(f"{section}/{name}")
    return update_cost.run_tree(
      *found[name], reps=args.reps, progress=progress, **kwargs
    )

  sections = args.sections
  if "memory" in sections:
    results["memory"] = update_cost.run_memory(found)
  if "update" in sections:
    resnet50 = tree("resnet50", "update", compile_reps=1, workers=workers)
    results["update"] = {"resnet50": resnet50}
  if "update" in sections or "compile" in sections:
    # One set of compilations serves both sections.
    reps = args.compile_reps if "compile" in sections else 1
    many = tree(
      "many_leaves", "update+compile", compile_reps=reps,
      time_updates="update" in sections,
    )  # fmt: skip
    if "update" in sections:
      results["update"]["many_leaves"] = many
    if "compile" in sections:
      results["compile"] = many
  if "train" in sections:
    results["train"] = train_step.run(
      args.sizes, reps=args.train_reps, update_reps=args.reps,
      progress=_progress("train"), workers=workers,
    )  # fmt: skip
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
    results = run(args, argv)
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)
  print(report.render(results), flush=True)
  _tasks.write_json(args.json, results)
  return results


if __name__ == "__main__":
  main()
