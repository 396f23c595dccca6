"""Draws the figures of the results page from the JSON under ``docs/data``.

Run by hand after a JSON file there changes: ``python docs/make_figures.py``.

Each data file that is present gives PNG figures and one reStructuredText
fragment under ``docs/figures``; a missing file is skipped. A page shows the
figures of a file with ``.. include:: figures/<file stem>.inc``.

* ``compare_<dataset>.json``: the ``results.json`` that ``python -m
  examples.compare --out DIR`` writes, optionally with the keys ``"command"``
  (the command that ran; without it the command is rebuilt from ``"args"``),
  ``"commit"`` and ``"machine"``, which the captions quote. Figures: test
  accuracy against step for every optimizer (mean over seeds, band from the
  lowest to the highest seed); LGM's per-layer α and applied scale at the
  end of each epoch (the LGM paper's Figure 1); how many steps
  ``layer_sam`` perturbed each layer (the Lee paper's Figure 5).
* ``time_to_target.json``: ``{"command", "machine", "target", "contenders":
  {name: {"seconds": [per seed, null if not reached], "final_accuracy": [per
  seed], "median_seconds": float | null}}}``. Figure: the median time to the
  target per contender, with each seed's time as a dot.

Every PNG carries the SHA-256 of the JSON it was drawn from (PNG text
``Source-SHA256``), so ``tests/test_docs.py`` fails when a figure is older
than its data.
"""

import argparse
import functools
import hashlib
import json
import pathlib
import shlex
import sys
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DOCS = pathlib.Path(__file__).resolve().parent
SOURCE_KEY = "Source-SHA256"
"""The PNG text key that holds the SHA-256 of the figure's JSON."""
FIGURE_COMMAND = "python docs/make_figures.py"


def sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def compare_command(data: dict) -> str:
  """The command of a comparison: its ``"command"``, or rebuilt from its args."""
  if "command" in data:
    return data["command"]
  flags = []
  for key, value in data["args"].items():
    if key in ("out", "data_dir", "no_progress") or value in (None, False):
      continue
    flags.append(f"--{key}" if value is True else f"--{key} {shlex.quote(str(value))}")
  return " ".join(["python -m examples.compare", *flags])


def _save(fig, path: pathlib.Path, source_sha: str) -> None:
  fig.savefig(path, dpi=100, metadata={SOURCE_KEY: source_sha, "Software": None})
  plt.close(fig)


def _spread(rows: list[dict]) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
  """The x's, then mean, lowest and highest over seeds (rows ``{x: value}``).

  A seed without a value at some x (a run cut short) is left out there; a
  value that is a list (per-slice statistics of stacked layers) counts as its
  mean.
  """
  xs = list(dict.fromkeys(x for row in rows for x in row))
  if all(isinstance(x, (int, float)) for x in xs):
    xs.sort()
  values = np.asarray(
    [[np.mean(row[x]) if x in row else np.nan for x in xs] for row in rows]
  )
  return xs, np.nanmean(values, 0), np.nanmin(values, 0), np.nanmax(values, 0)


def _curves(runs: list[dict]) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
  return _spread([{p["step"]: p["test_accuracy"] for p in r["curve"]} for r in runs])


def draw_curves(data: dict, path: pathlib.Path, sha: str) -> tuple[str, str]:
  runs = data["runs"]
  target = data["args"]["target"]
  cols = 4
  rows = -(-(len(runs) + 1) // cols)
  fig, axes = plt.subplots(
    rows, cols, figsize=(3 * cols, 2.6 * rows), sharex=True, squeeze=False,
    layout="constrained",
  )  # fmt: skip
  overview, *panels = axes.flat
  floor = min(0.85, round(target - 0.1, 2))  # The enlarged panels' bottom.
  reference = next(iter(runs))
  ref_steps, ref_mean, _, _ = _curves(runs[reference])
  for i, ((name, name_runs), ax) in enumerate(zip(runs.items(), panels)):
    steps, mean, low, high = _curves(name_runs)
    overview.plot(steps, mean, color=f"C{i}", linewidth=1, label=name)
    ax.fill_between(steps, low, high, color=f"C{i}", alpha=0.3, linewidth=0)
    ax.plot(steps, mean, color=f"C{i}", linewidth=1.2, label=name)
    if name != reference:
      ax.plot(ref_steps, ref_mean, color="gray", linewidth=0.8, label=reference)
    ax.set(ylim=(floor, 1.0))
    ax.legend(loc="lower right", fontsize="small")
  for ax in axes.flat[len(runs) + 1 :]:
    ax.axis("off")
  overview.set(ylim=(0, 1), title="mean of every optimizer")
  overview.legend(loc="lower right", fontsize="x-small", ncol=2)
  for ax in axes.flat[: len(runs) + 1]:
    ax.axhline(target, color="black", linestyle=":", linewidth=0.8)
    ax.grid(alpha=0.3)
  for ax in axes[:, 0]:
    ax.set_ylabel("test accuracy")
  for ax in axes[-1]:
    ax.set_xlabel("step")
  _save(fig, path, sha)
  args = data["args"]
  length = f"{args['epochs']} epochs"
  if args.get("max_steps"):
    length = f"{args['max_steps']} steps"
  tuned = ", each at its tuned settings" if data.get("tuning") else ""
  alt = f"Test accuracy against step of each optimizer, {args['dataset']}"
  return alt, (
    f"Test accuracy against training step, {args['dataset']} ({args['model']}, "
    f"{length}, batch {args['batch_size']}, evaluated every "
    f"{args['eval_every']} steps{tuned}). Top left: the mean over "
    f"{len(runs[reference])} seeds of every optimizer. Other panels, enlarged "
    f"to {floor:g}–1: one optimizer's mean (line) and the span from its lowest to "
    f"its highest seed (band), with {reference}'s mean in gray. Dotted: the "
    f"target of {target:g}."
  )


def draw_lgm(data: dict, path: pathlib.Path, sha: str) -> tuple[str, str]:
  runs = data["runs"]["lgm"]
  layers = list(runs[0]["history"][0]["layer_stats"]["lgm_alpha"])
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharex=True, layout="constrained")
  for ax, key, title in (
    (axes[0], "lgm_alpha", r"$\alpha_l$: EMA of $\mathrm{Var}_l^{-1/2}$"),
    (axes[1], "lgm_scale", "scale applied to the gradient (normalised, clipped)"),
  ):
    for layer in layers:
      epochs, mean, low, high = _spread(
        [{h["epoch"]: h["layer_stats"][key][layer] for h in r["history"]} for r in runs]
      )
      (line,) = ax.plot(epochs, mean, marker="o", markersize=3, label=layer)
      ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.15)
    ax.set(xlabel="epoch", yscale="log", title=title)
    ax.grid(alpha=0.3, which="both")
  axes[1].legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
  _save(fig, path, sha)
  alt = f"LGM's alpha and scale per layer against epoch, {data['args']['dataset']}"
  return alt, (
    f"LGM's per-layer factors at the end of each epoch, {data['args']['dataset']}"
    f" ({data['args']['model']}), mean over {len(runs)} seeds (band: lowest to "
    "highest seed); left the running α of each layer, right the factor that "
    "multiplies its gradient (α divided by the geometric mean over layers, "
    "clipped to [0.1, 10], the defaults)."
  )


def draw_selection(data: dict, path: pathlib.Path, sha: str) -> tuple[str, str]:
  runs = data["runs"]["layer_sam"]
  counts = [run["history"][-1]["layer_stats"]["sam_selected_count"] for run in runs]
  steps = runs[0]["history"][-1]["step"]
  layers, mean, low, high = _spread(counts)
  x = np.arange(len(layers))
  fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
  ax.bar(x, mean, yerr=[mean - low, high - mean], capsize=4, label="layer_sam")
  ax.axhline(steps, color="black", linestyle="--", linewidth=1)
  ax.annotate(
    f"SAM: every layer, every step ({steps})", (x[0] - 0.4, steps * 1.01), va="bottom"
  )
  ax.set_xticks(x, layers)
  per_step = float(np.sum(mean)) / steps  # k, when every step perturbs k layers.
  ax.set(ylabel="steps perturbed", ylim=(0, steps * 1.12))
  ax.set_title(f"layer_sam: {per_step:.3g} layers perturbed per step on average")
  _save(fig, path, sha)
  alt = f"Steps in which layer_sam perturbed each layer, {data['args']['dataset']}"
  return alt, (
    f"How many of the {steps} training steps ``layer_sam`` perturbed each layer"
    f" ({data['args']['dataset']}, {data['args']['model']}): mean over "
    f"{len(runs)} seeds, the whiskers span the lowest to the highest seed. SAM "
    "perturbs every layer at every step (dashed)."
  )


def draw_time_to_target(data: dict, path: pathlib.Path, sha: str) -> tuple[str, str]:
  names = list(data["contenders"])
  fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
  for i, name in enumerate(names):
    entry = data["contenders"][name]
    reached = [s for s in entry["seconds"] if s is not None]
    if entry["median_seconds"] is not None:
      ax.bar(i, entry["median_seconds"], color="C0", alpha=0.7)
    ax.plot([i] * len(reached), reached, "o", color="black", markersize=4)
    missed = len(entry["seconds"]) - len(reached)
    if missed:
      ax.annotate(f"{missed} not reached", (i, 0), ha="center", va="bottom")
  ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
  ax.set(ylabel="seconds to target", title=f"time to {data['target']:g} accuracy")
  ax.grid(alpha=0.3, axis="y")
  _save(fig, path, sha)
  alt = "Seconds to the target accuracy per optimizer"
  return alt, (
    f"Wall-clock seconds to the first evaluation at {data['target']:g} test "
    "accuracy (bar: the median over seeds, none where a seed missed the "
    "target; dots: each seed that reached it)."
  )


def draw_trainer_time_to_target(
  data: dict, path: pathlib.Path, sha: str, limits: tuple[float, ...] = (0.85,)
) -> tuple[str, str]:
  models = list(dict.fromkeys(key.split("/")[0] for key in data["summaries"]))
  legend_beside = len(data["summaries"][next(iter(data["summaries"]))]) > 4
  fig, axes = plt.subplots(
    1, len(models), figsize=(4.2 * len(models) + 2.2 * legend_beside, 3.8),
    layout="constrained",
  )  # fmt: skip
  for ax, model in zip(np.atleast_1d(axes), models):
    keys = [k for k in data["summaries"] if k.startswith(f"{model}/")]
    names = list(data["summaries"][keys[0]])
    width = 0.8 / len(names)
    for j, name in enumerate(names):
      for i, key in enumerate(keys):
        summary = data["summaries"][key]
        sam = summary["sam"]["median_time_to_target"]
        seeds = [t / sam for t in summary[name]["time_to_target"] if t is not None]
        x = i + (j - (len(names) - 1) / 2) * width
        ax.bar(x, summary[name]["median_time_to_target"] / sam, width, color=f"C{j}",
               alpha=0.7, label=name if i == 0 else None)  # fmt: skip
        ax.plot([x] * len(seeds), seeds, "o", color="black", markersize=3)
    for limit in limits:
      ax.axhline(limit, color="black", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(keys)), [k.split("/")[1] for k in keys])
    ax.set(title=model, ylabel="time to target / SAM's median")
    ax.grid(alpha=0.3, axis="y")
  if legend_beside:  # Many contenders: beside the axes, not over the bars.
    fig.legend(loc="outside right upper", fontsize="small")
  else:
    np.atleast_1d(axes)[0].legend()
  _save(fig, path, sha)
  contenders = ", ".join(names)
  alt = f"Time to target of {contenders} relative to SAM, by run length"
  return alt, (
    f"Time to the target through the trainer of {contenders}, relative to "
    "SAM's median, at each run length (bars: medians over seeds; dots: each "
    f"seed; dashed {'lines' if len(limits) > 1 else 'line'}: the "
    f"{' and '.join(f'{limit:g}' for limit in limits)} "
    f"target{'s' if len(limits) > 1 else ''})."
  )


def _figure(
  png: str, width: str, text: tuple[str, str], source: pathlib.Path, data: dict
) -> str:
  if not source.stem.startswith("compare_"):
    command = data["command"]
  else:
    command = compare_command(data)
  commit = f" at commit {data['commit']}" if data.get("commit") else ""
  machine = f", run on {data['machine']}" if data.get("machine") else ""
  return (
    f".. figure:: /figures/{png}\n"
    f"   :name: {png.removesuffix('.png')}\n"
    f"   :alt: {text[0]}\n"
    f"   :width: {width}\n\n"
    f"   {text[1]} Data: ``{command}``{commit}{machine} "
    f"(``docs/data/{source.name}``); "
    f"figure: ``{FIGURE_COMMAND}``.\n"
  )


Drawer = Callable[[dict, pathlib.Path, str], tuple[str, str]]
"""Draws one figure into a PNG; returns its alt text and caption."""


def figures_for(name: str, data: dict) -> list[tuple[str, Drawer, str]]:
  """The figures of one data file: (PNG suffix, drawing function, width)."""
  if name in ("time_to_target", "time_to_target_default_rule"):
    return [("", draw_time_to_target, "70%")]
  if name == "trainer_time_to_target":
    return [("", draw_trainer_time_to_target, "100%")]
  if name == "trainer_time_sparse":
    return [("", functools.partial(draw_trainer_time_to_target, limits=(0.7,)), "100%")]
  if name == "trainer_time_to_target_fashion_mnist":
    both = functools.partial(draw_trainer_time_to_target, limits=(0.7, 0.85))
    return [("", both, "90%")]
  figures = [("_curves", draw_curves, "100%")]
  if "lgm" in data["runs"]:
    figures.append(("_lgm", draw_lgm, "100%"))
  if "layer_sam" in data["runs"]:
    figures.append(("_layer_sam", draw_selection, "60%"))
  return figures


def sources(data_dir: pathlib.Path) -> list[pathlib.Path]:
  """The data files of ``data_dir`` that have figures (the others: tables only)."""
  found = sorted(data_dir.glob("compare_*.json"))
  benchmarks = ("time_to_target.json", "time_to_target_default_rule.json")
  benchmarks += ("trainer_time_to_target.json",)
  benchmarks += (
    "trainer_time_sparse.json",
    "trainer_time_to_target_fashion_mnist.json",
  )
  return found + [data_dir / name for name in benchmarks if (data_dir / name).exists()]


def make_figures(data_dir: pathlib.Path, out: pathlib.Path) -> list[pathlib.Path]:
  """Draws the figures of every data file of ``data_dir``; returns the files."""
  out.mkdir(parents=True, exist_ok=True)
  written = []
  for source in sources(data_dir):
    data = json.loads(source.read_text())
    sha = sha256(source)
    fragment = []
    for suffix, draw, width in figures_for(source.stem, data):
      png = out / f"{source.stem}{suffix}.png"
      text = draw(data, png, sha)
      fragment.append(_figure(png.name, width, text, source, data))
      written.append(png)
    inc = out / f"{source.stem}.inc"
    inc.write_text(
      f".. Written by {FIGURE_COMMAND} from docs/data/{source.name}.\n\n"
      + "\n".join(fragment)
    )
    written.append(inc)
  return written


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", type=pathlib.Path, default=DOCS / "data")
  parser.add_argument("--out", type=pathlib.Path, default=DOCS / "figures")
  args = parser.parse_args(argv)
  for path in make_figures(args.data, args.out):
    print(f"wrote {path}")


if __name__ == "__main__":
  main(sys.argv[1:])
