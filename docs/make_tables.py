"""Writes the tables of the results page from the JSON under ``docs/data``.

Run by hand after a JSON file there changes: ``python docs/make_tables.py``.

Each entry of ``TABLES`` turns one data file into one reStructuredText
``list-table`` under ``docs/figures`` (``<file stem>_table.inc``); the page
includes it with ``.. include:: figures/<file stem>_table.inc``. The caption
quotes the command, the commit and the machine recorded in the JSON. A table
of a new benchmark is one more entry: a function from the JSON to a header
and rows, and its key, the JSON file's stem.

Every fragment records the SHA-256 of the JSON it was written from, so
``tests/test_docs.py`` fails when a table is older than its data or differs
from what this script writes now.
"""

import argparse
import hashlib
import json
import pathlib
import statistics
import sys
from collections.abc import Callable, Sequence

DOCS = pathlib.Path(__file__).resolve().parent
TABLE_COMMAND = "python docs/make_tables.py"
Table = tuple[list[str], list[list[str]]]
"""A header and its rows, every cell a string."""


def sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _mean_std(values: Sequence[float], digits: int) -> str:
  """``mean ± std`` (population std, as over seeds on the whole page)."""
  return (
    f"{statistics.fmean(values):.{digits}f} ± {statistics.pstdev(values):.{digits}f}"
  )


def _percent(target: float) -> str:
  return f"{100 * target:g}%"


def markdown(table: Table) -> str:
  """A table as markdown, for a terminal (``python -m examples.compare``)."""
  header, rows = table
  lines = [header, ["---"] * len(header), *rows]
  return "\n".join("| " + " | ".join(row) + " |" for row in lines)


ROBUSTNESS = {
  "clean": "clean (robustness subset)",
  "fgsm@0.0314": "FGSM 8/255",
  "pgd@0.0314": "PGD 8/255",
  "fgsm@0.1": "FGSM 0.1",
  "pgd@0.1": "PGD 0.1",
  "noise@0.1": "noise 0.1",
}
"""The robustness columns of a comparison: key in the JSON -> header."""


PERFORMANCE = (
  "images/s",
  "compile s, first seed (critical / background)",
  "compilations",
  "selection changes",
)
"""The cost columns that ``python -m examples.compare`` adds to its table."""


def compare_table(
  data: dict, robustness: dict[str, str] = ROBUSTNESS, performance: bool = False
) -> Table:
  """``python -m examples.compare``'s ``results.json``: one row per optimizer.

  Mean ± std over seeds; steps to the target over the runs that reached it,
  with how many did; seconds to the target as the median over seeds, a miss
  counting as infinite. ``robustness`` maps the robustness keys shown to their
  headers; ``performance`` adds the `PERFORMANCE` columns: throughput, the
  first seed's compile seconds (the later seeds reuse its programs), and the
  medians of compilations and selection changes.
  """
  target = _percent(data["args"]["target"])
  header = [
    "optimizer",
    "lr",
    "test acc",
    f"steps to {target} (runs)",
    f"seconds to {target} (median)",
    *(PERFORMANCE if performance else ()),
    *robustness.values(),
  ]
  rows = []
  for name, summary in data["summary"].items():
    steps = [s for s in summary["steps_to_target"] if s is not None]
    runs = f"({len(steps)}/{len(summary['steps_to_target'])})"
    times = [float("inf") if t is None else t for t in summary["time_to_target"]]
    median = statistics.median(times)
    robust = summary.get("robustness", {})
    cost = []
    if performance:
      cost = [
        _mean_std(summary["images_per_s"], 0),
        f"{summary['compile_seconds'][0]:.1f} / "
        f"{summary['background_compile_seconds'][0]:.1f}",
        f"{statistics.median(summary['compilations']):g}",
        f"{statistics.median(summary['selection_changes']):g}",
      ]
    rows.append(
      [
        name,
        f"{summary['learning_rate']:.3g}"
        + (f", rho {summary['rho']:g}" if summary.get("rho") else ""),
        _mean_std(summary["test_accuracy"], 4),
        f"{_mean_std(steps, 0)} {runs}" if steps else f"— {runs}",
        "—" if median == float("inf") else f"{median:.1f}",
        *cost,
        *(_mean_std(robust[key], 3) if key in robust else "—" for key in robustness),
      ]
    )
  return header, rows


def time_to_target_table(data: dict) -> Table:
  """``python -m benchmarks.time_to_target --json``: one row per contender.

  Medians over seeds, a miss counting as infinite; the final accuracy (the
  mean of the last evaluations of a run) as mean ± std over seeds, in percent.
  """
  target = _percent(data["target"])
  contenders = data["contenders"]
  sam = contenders.get("sam", {}).get("median_seconds")
  header = [
    "contender",
    f"time to {target} (median s)",
    "× SAM",
    "seeds reaching it",
    "per seed (s)",
    "steps to target (median)",
    "final accuracy (%)",
    "compilations",
  ]
  rows = []
  for name, c in contenders.items():
    median = c["median_seconds"]
    reached = sum(s is not None for s in c["seconds"])
    final = [100 * a for a in c["final_accuracy"]]
    rows.append(
      [
        name,
        "—" if median is None else f"{median:.1f}",
        "—" if median is None or not sam else f"{median / sam:.2f}",
        f"{reached}/{len(c['seconds'])}",
        ", ".join("—" if s is None else f"{s:.0f}" for s in c["seconds"]),
        "—" if c.get("median_steps") is None else f"{c['median_steps']:.0f}",
        _mean_std(final, 1),
        ", ".join(str(n) for n in sorted(set(c["compilations"]))),
      ]
    )
  return header, rows


def trainer_time_to_target_table(data: dict) -> Table:
  """``benchmarks.trainer_time_to_target``: a row per model, length, contender.

  Medians over seeds (a miss counting as infinite), the final accuracy as
  mean ± std over seeds, the compile seconds on the critical path and in the
  background, the compilations and the selection changes (medians).
  """
  header = [
    "model",
    "length (lr, target)",
    "contender",
    "time to target (median s)",
    "× SAM",
    "per seed (s)",
    "steps to target (median)",
    "final accuracy (%)",
    "compile s: critical / background",
    "compilations",
    "selection changes",
  ]
  rows = []
  for key, summary in data["summaries"].items():
    model, length = key.split("/")
    learning_rate, target, _ = data["lengths"][model][length]
    sam = summary.get("sam", {}).get("median_time_to_target")
    for name, s in summary.items():
      median = s["median_time_to_target"]
      steps = sorted(x for x in s["steps_to_target"] if x is not None)
      final = [100 * a for a in s["final_test_accuracy"]]
      finite = median != float("inf")
      rows.append(
        [
          model,
          f"{length} ({learning_rate:g}, {_percent(target)})",
          name,
          f"{median:.1f}" if finite else "—",
          f"{median / sam:.2f}" if finite and sam else "—",
          ", ".join("—" if t is None else f"{t:.1f}" for t in s["time_to_target"]),
          f"{statistics.median(steps):.0f}" if steps else "—",
          _mean_std(final, 1),
          f"{statistics.median(s['compile_critical_s']):.1f} / "
          f"{statistics.median(s['compile_background_s']):.1f}",
          f"{statistics.median(s['compilations']):g}",
          f"{statistics.median(len(c) for c in s['selection_changes']):g}",
        ]
      )
  return header, rows


def tuning_table(data: dict) -> Table:
  """``python -m examples.compare --tune``'s grids and choices: a row per optimizer.

  Each learning rate tried with its final validation accuracy (one seed),
  then the radii of ``sam`` and ``layer_sam`` at the chosen rate, the choice,
  and whether the chosen rate lies strictly inside the grid.
  """
  header = [
    "optimizer",
    "learning rate: validation accuracy (%)",
    "rho: validation accuracy (%)",
    "chosen lr",
    "chosen rho",
    "inside the grid",
  ]
  rows = []
  for name, t in data["tuning"].items():
    chosen = t["chosen"]
    rows.append(
      [
        name,
        ", ".join(
          f"{r['learning_rate']:.3g}: {100 * r['validation_accuracy']:.1f}"
          for r in t["grid"]
        ),
        ", ".join(
          f"{r['rho']:g}: {100 * r['validation_accuracy']:.1f}" for r in t["rho_grid"]
        )
        or "—",
        f"{chosen['learning_rate']:.3g}",
        f"{chosen['rho']:g}" if t["rho_grid"] else "—",
        ("yes" if t["inside"] else "no")
        + (f" (widened {len(t['widened'])}×)" if t["widened"] else ""),
      ]
    )
  return header, rows


def tuned_tables(data: dict) -> list[tuple[str, Table]]:
  """A tuned comparison: the tuning, then `compare_table` at the chosen settings."""
  return [
    ("Tuning on the validation split. ", tuning_table(data)),
    ("At the chosen settings, on the test set. ", compare_table(data)),
  ]


def _ratio(r: dict) -> str:
  """A median ratio with its 25th–75th percentile in brackets."""
  return f"{r['ratio']:.2f} ({r['ratio_q25']:.2f}–{r['ratio_q75']:.2f})"


def _kernels(c: dict) -> str:
  return f"{c['fusions']} ({c['distinct_fusions']})"


def tree_title(tree: dict) -> str:
  """The title of a parameter tree of ``python -m benchmarks``."""
  return f"{tree['title']}: {tree['leaves']:,} leaves, {tree['params']:,} parameters"


def update_table(tree: dict) -> Table:
  """``python -m benchmarks``, section 1: the update cost on one tree."""
  header = ["transformation", "median ms", "× scale_by_adam", "passes"]
  rows = []
  for name, row in tree["rows"].items():
    u = row.get("update")
    timing = ["—", "—"] if u is None else [f"{u['median_s'] * 1e3:.2f}", _ratio(u)]
    rows.append([name, *timing, f"{row['passes']:.1f}", _kernels(row["compile"])])
  return [*header, "kernels (distinct)"], rows


def compile_table(tree: dict) -> Table:
  """``python -m benchmarks``, section 2: the compile time on the many-leaf tree."""
  header = ["transformation", "trace+lower s", "XLA compile s", "total s"]
  rows = []
  for name, row in tree["rows"].items():
    c = row["compile"]
    tl, cs = statistics.median(c["trace_lower_s"]), statistics.median(c["compile_s"])
    seconds = [f"{s:.1f}" for s in (tl, cs, c["total_s"])]
    rows.append([name, *seconds, f"{c['ratio']:.2f}", _kernels(c)])
  return [*header, "× scale_by_adam", "kernels (distinct)"], rows


def memory_table(trees: dict) -> Table:
  """``python -m benchmarks``, section 3: optimizer-state bytes, two columns a tree."""
  header = ["transformation"]
  for name in trees:
    header += [f"{name} bytes", "× Adam"]
  rows = []
  for name in next(iter(trees.values()))["rows"]:
    row = [name]
    for tree in trees.values():
      r = tree["rows"][name]
      row += [f"{r['bytes']:,}", f"{r['ratio']:.2g}"]
    rows.append(row)
  return header, rows


def train_table(res: dict) -> Table:
  """``python -m benchmarks``, section 4: a whole training step per optimizer."""
  header = ["optimizer", "median ms", "× SGD", "GFLOP/step", "compile s"]
  header += ["update alone ms", "step ratio implied"]
  rows = []
  for name, row in res["rows"].items():
    step, alone, bound = row["step"], "—", "—"
    if "update_alone" in row:
      alone = f"{row['update_alone']['median_s'] * 1e3:.3f}"
      bound = f"{row['step_bound']:.4f}"
    ms, gflops, compile_s = step["median_s"] * 1e3, row["gflops"], row["compile_s"]
    cells = [f"{ms:.1f}", _ratio(step), f"{gflops:.2f}", f"{compile_s:.1f}"]
    rows.append([name, *cells, alone, bound])
  return header, rows


def lgm_defaults_table(data: dict) -> Table:
  """``python -m benchmarks.lgm_defaults --json``: one row per LGM variant.

  The test accuracy as mean ± std over seeds; the steps to the target as the
  mean over the runs that reached it, with how many did.
  """
  header = ["variant", "lr", "test acc", f"steps to {_percent(data['target'])} (runs)"]
  rows = []
  for name, r in data["rows"].items():
    steps = "—" if r["steps_to_target"] is None else f"{r['steps_to_target']:.0f}"
    rows.append(
      [
        name,
        f"{r['lr']:g}",
        f"{r['acc_mean']:.4f} ± {r['acc_std']:.4f}",
        f"{steps} ({r['reached']}/{data['seeds']})",
        str(r["diverged"]),
      ]
    )
  return [*header, "diverged"], rows


def sam_schedule_tables(data: dict) -> list[tuple[str, Table]]:
  """``python -m benchmarks.sam_schedule --json``: a table of step times per model."""
  tables = []
  for model, result in data["results"].items():
    rows = [
      [label, f"{1e3 * seconds:.2f}", f"{result['ratio_to_sgd'][label]:.2f}"]
      for label, seconds in result["per_step_s"].items()
    ]
    title = f"Step time, {model}. "
    tables.append((title, (["contender", "ms / step", "× SGD"], rows)))
  return tables


def dgs_transfer_table(data: dict) -> Table:
  """``python -m benchmarks.dgs_transfer --json``: a row per model, a column per rate.

  The final test accuracy of each (model, learning rate); one seed.
  """
  rates = list(dict.fromkeys(r["lr"] for r in data["rows"]))
  cells: dict[str, dict] = {}
  for r in data["rows"]:
    row = cells.setdefault(r["model"], {"params": r["params"]})
    row[r["lr"]] = f"{100 * r['accuracy']:.1f}%"
  rows = [
    [model, f"{row['params']:,}", *(row.get(lr, "—") for lr in rates)]
    for model, row in cells.items()
  ]
  return ["model", "parameters", *(f"lr {lr:g}" for lr in rates)], rows


def layer_sam_speed_tables(data: dict) -> list[tuple[str, Table]]:
  """``python -m benchmarks.layer_sam_speed --json``: a table per XLA configuration.

  Medians over the interleaved rounds; ratios of medians to SGD's step and
  SAM's step of the same configuration.
  """
  tables = []
  configs = dict.fromkeys(key.split("/", 1)[0] for key in data["results"])
  for cfg in configs:
    run = {name: data["results"][f"{cfg}/{name}"] for name in data["contenders"]}
    ms = {name: statistics.median(r["ms"]) for name, r in run.items()}
    sgd, sam, sgd_gflops = ms["SGD"], ms["optax.contrib.sam"], run["SGD"]["gflops"]
    rows = []
    for name, selection in data["contenders"].items():
      r = run[name]
      rows.append(
        [
          name,
          "—" if selection is None else ", ".join(map(str, selection)),
          f"{r['gflops']:.2f}",
          f"{ms[name]:.0f}",
          f"{min(r['ms']):.0f}",
          f"{ms[name] / sgd:.2f}",
          f"{sam / ms[name]:.2f}",
          f"{r['gflops'] / sgd_gflops:.2f}",
        ]
      )
    header = ["contender", "selection", "GFLOP/step", "median ms", "min ms", "× SGD"]
    tables.append(
      (f"Step time, {cfg}. ", ([*header, "SAM ÷ this", "GFLOP × SGD"], rows))
    )
  return tables


def layer_sam_defaults_table(data: dict) -> Table:
  """``python -m benchmarks.layer_sam_speed --defaults --json``: a row per setting.

  Means over the probes along the SGD run; the static step's FLOPs with the
  most frequent selection.
  """
  sgd = data["flops"]["sgd"]
  rows = [
    [
      r["layers"],
      str(r["k"]),
      r["budget"] or "all",
      f"{r['captured']:.3f}",
      f"{r['cosine']:.4f}",
      f"{r['share']:.3f}",
      str(r["distinct"]),
      ", ".join(r["common"]),
      f"{r['gflops']:.2f} ({r['gflops'] / sgd:.2f})",
    ]
    for r in data["rows"].values()
  ]
  header = ["layers", "k", "candidates", "captured", "cosine(g~, g_SAM)"]
  header += ["norm² share of S", "distinct selections", "most frequent selection"]
  return [*header, "static GFLOP (× SGD)"], rows


def benchmarks_tables(data: dict) -> list[tuple[str, Table]]:
  """``python -m benchmarks --json``: a table per section that ran."""
  tables = [
    (f"Update cost, {tree_title(tree)}. ", update_table(tree))
    for tree in data.get("update", {}).values()
  ]
  if "compile" in data:
    title = f"Compile time, {tree_title(data['compile'])}. "
    tables.append((title, compile_table(data["compile"])))
  if "memory" in data:
    tables.append(("Optimizer-state memory. ", memory_table(data["memory"])))
  if "train" in data:
    t = data["train"]
    title = (
      f"Train step, {t['model']}, {t['params']:,} parameters, batch {t['batch']}. "
    )
    tables.append((title, train_table(t)))
  return tables


TABLES: dict[str, Callable[[dict], Table | list[tuple[str, Table]]]] = {
  "compare_digits": compare_table,
  "compare_fashion_mnist": compare_table,
  "time_to_target": time_to_target_table,
  "time_to_target_default_rule": time_to_target_table,
  "trainer_time_to_target": trainer_time_to_target_table,
  "trainer_time_sparse": trainer_time_to_target_table,
  "trainer_time_to_target_fashion_mnist": trainer_time_to_target_table,
  "compare_tuned_digits_cnn": tuned_tables,
  "compare_tuned_fashion_mnist_cnn": tuned_tables,
  "compare_tuned_fashion_mnist_resnet20": tuned_tables,
  "compare_tuned_digits_resnet20": tuned_tables,
  "benchmarks": benchmarks_tables,
  "lgm_defaults": lgm_defaults_table,
  "sam_schedule": sam_schedule_tables,
  "dgs_transfer": dgs_transfer_table,
  "layer_sam_speed": layer_sam_speed_tables,
  "layer_sam_defaults": layer_sam_defaults_table,
}
"""JSON file stem under ``docs/data`` -> the function that makes its table (or
its titled tables)."""


def caption(data: dict, source: str) -> str:
  """Where the numbers come from: command, commit and machine of the JSON."""
  parts = [f"Data: ``{data['command']}``"]
  if "commit" in data:
    parts.append(f" at commit {data['commit']}")
  if "machine" in data:
    parts.append(f", run on {data['machine']}")
  return "".join(parts) + f" (``{source}``); table: ``{TABLE_COMMAND}``."


def render(source: pathlib.Path) -> str:
  """The reStructuredText fragment of the table of ``source``."""
  data = json.loads(source.read_text())
  tables = TABLES[source.stem](data)
  if isinstance(tables, tuple):
    tables = [("", tables)]
  name = f"docs/data/{source.name}"
  lines = [f".. Written by {TABLE_COMMAND} from {name} (SHA-256 {sha256(source)})."]
  for title, (header, rows) in tables:
    table = f".. list-table:: {title}{caption(data, name)}"
    lines += ["", table, "   :header-rows: 1", ""]
    for row in [header, *rows]:
      lines.append(f"   * - {row[0]}")
      lines.extend(f"     - {cell}" for cell in row[1:])
  return "\n".join(lines) + "\n"


def table_path(out: pathlib.Path, stem: str) -> pathlib.Path:
  return out / f"{stem}_table.inc"


def make_tables(data_dir: pathlib.Path, out: pathlib.Path) -> list[pathlib.Path]:
  """Writes the table of every data file of ``TABLES`` that is present."""
  written = []
  for stem in TABLES:
    source = data_dir / f"{stem}.json"
    if source.exists():
      path = table_path(out, stem)
      path.write_text(render(source))
      written.append(path)
  return written


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", type=pathlib.Path, default=DOCS / "data")
  parser.add_argument("--out", type=pathlib.Path, default=DOCS / "figures")
  args = parser.parse_args(argv)
  for path in make_tables(args.data, args.out):
    print(path, file=sys.stderr)


if __name__ == "__main__":
  main()
