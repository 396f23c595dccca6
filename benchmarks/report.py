"""Markdown rendering of the benchmark results, and the targets of the issue."""

from typing import Any

from benchmarks import train_step, update_cost
from examples import loop

make_tables = loop.docs_script("make_tables")  # The results page's cells.


def update_section(results: dict[str, Any]) -> list[str]:
  """Section 1: update cost per tree."""
  lines = [
    "## 1. Update cost: `jax.jit(tx.update)(grads, state, params)`",
    "",
    "Ratio: median over rounds of the time divided by `optax.scale_by_adam`'s "
    "in the same round (25th–75th percentile in brackets). Passes: the bytes "
    "XLA's `cost_analysis` says one call reads and writes, in units of the "
    "tree's float32 bytes (reading the gradient and writing the update is "
    "2). Kernels: the fused computations of the optimised HLO, and how many "
    "are distinct (XLA compiles identical ones once).",
  ]
  for tree in results.values():
    table = make_tables.markdown(make_tables.update_table(tree))
    lines += ["", f"### {make_tables.tree_title(tree)}", "", table]
  return lines


def compile_section(tree: dict[str, Any], reps: int) -> list[str]:
  """Section 2: compile time on the many-leaf tree."""
  return [
    f"## 2. Compile time: {make_tables.tree_title(tree)}",
    "",
    f"Trace + lower + XLA compile of the same jitted update, median of {reps} "
    "interleaved round(s), each from a new Python function (no cache).",
    "",
    make_tables.markdown(make_tables.compile_table(tree)),
  ]


def memory_section(results: dict[str, Any]) -> list[str]:
  """Section 3: optimizer-state bytes, a pair of columns per tree."""
  lines = ["## 3. Optimizer-state memory (bytes of `tx.init(params)`)", ""]
  for tree in results.values():
    title = make_tables.tree_title(tree)
    lines.append(
      f"- {title}; {tree['layers']} layers with `layers='leaf'`, "
      f"{tree['modules']} with `layers='module'`."
    )
  return [*lines, "", make_tables.markdown(make_tables.memory_table(results))]


def train_section(res: dict[str, Any]) -> list[str]:
  """Section 4: train-step cost."""
  return [
    f"## 4. Train step: {res['model']}, {res['params']:,} parameters, "
    f"batch {res['batch']}, {res['image']}x{res['image']}x3",
    "",
    "Forward, backward, update and apply, jitted; ratio to the SGD step of "
    "the same round. GFLOP: XLA's `cost_analysis`. Compile s: trace, lower "
    "and compile, several steps compiling at once (indicative only). "
    "Update alone: `tx.update` jitted by itself on this model's gradients "
    "(state fed back), timed interleaved like section 1; the step ratio it "
    "implies is 1 + (its time − SGD's update time) / SGD's step time, which "
    "whole-step noise does not blur (not for the SAMs: their update runs a "
    "second forward and backward pass).",
    "",
    make_tables.markdown(make_tables.train_table(res)),
  ]


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
  """The issue's targets, each with the measured figure and whether it is met."""
  out = []

  def rows(section: str, tree: str | None = None) -> dict[str, Any]:
    found = results.get(section, {})
    return (found.get(tree, {}) if tree else found).get("rows", {})

  def add(target: str, value: float, limit: float, **more) -> None:
    out.append(
      dict(target=target, value=value, limit=limit, met=value <= limit, **more)
    )

  update, compile_, train = rows("update", "resnet50"), rows("compile"), rows("train")
  for name, limit in update_cost.UPDATE_TARGETS.items():
    if "update" in update.get(name, {}):
      title = results["update"]["resnet50"]["title"]
      add(f"{name} update ≤ {limit}× scale_by_adam ({title})",
          update[name]["update"]["ratio"], limit)  # fmt: skip
  limit = update_cost.COMPILE_TARGET
  for name in update_cost.UPDATE_TARGETS:
    if "compile" in compile_.get(name, {}):
      add(f"{name} compile ≤ {limit}× scale_by_adam (many-leaf tree)",
          compile_[name]["compile"]["ratio"], limit)  # fmt: skip
  for name, limit in train_step.TARGETS.items():
    if "step" in train.get(name, {}):
      step = train[name]["step"]
      add(f"{name} train step ≤ {limit}× SGD", step["ratio"], limit,
          q25=step["ratio_q25"], bound=train[name].get("step_bound"))  # fmt: skip
  return out


def _status(t: dict[str, Any]) -> str:
  """Met or missed; a missed step ratio the timing cannot resolve says whether
  the update alone explains the excess."""
  if t["met"] or t.get("bound") is None or t["q25"] > t["limit"]:
    return "met" if t["met"] else "**missed**"
  return (
    f"not resolved by the step timing (25th percentile {t['q25']:.2f}); "
    f"the update alone implies {t['bound']:.4f}: "
    + ("met" if t["bound"] <= t["limit"] else "**missed**")
  )


def render(results: dict[str, Any]) -> str:
  """The whole report as markdown."""
  meta = results["meta"]
  lines = [
    "# optax_lgm benchmarks",
    "",
    f"- Device: **{meta['device']}** ({meta['device_count']} device(s)); host "
    f"{meta['cpu_count']} CPU cores, load average {meta['load_start']} at the "
    f"start, {meta['load_end']} at the end.",
    f"- {meta['gpu_note']}",
    f"- jax {meta['jax']}, jaxlib {meta['jaxlib']}, optax {meta['optax']}, "
    f"flax {meta['flax']}, optax_lgm {meta['optax_lgm']}; python {meta['python']}.",
    f"- Sizes: {meta['sizes']}; interleaved rounds: {meta['reps']} per update "
    f"timing, {meta['train_reps']} per train-step timing, "
    f"{meta['compile_reps']} per compile time.",
    f"- Sections: {', '.join(meta['sections'])}.",
  ]
  if meta.get("quick"):
    lines.append(
      "- **--quick**: tiny sizes and XLA optimisations off; a smoke test, "
      "the figures mean nothing."
    )
  sections = {
    "update": update_section,
    "compile": lambda r: compile_section(r, meta["compile_reps"]),
    "memory": memory_section,
    "train": train_section,
  }
  for name, section in sections.items():
    if name in results:
      lines += ["", *section(results[name])]
  lines += ["", "## Targets", "", "| target | measured | status |", "|---|---|---|"]
  for t in results["targets"]:
    lines.append(f"| {t['target']} | {t['value']:.2f} | {_status(t)} |")
  lines += [
    "",
    f"Ran in {meta['seconds']:.0f} s of wall time ({meta['cpu_seconds']:.0f} s "
    "of CPU time in this process).",
  ]
  return "\n".join(lines)
