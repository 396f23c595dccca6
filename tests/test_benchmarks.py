"""Smoke test of the benchmark report (``python -m benchmarks``): no timings."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

from benchmarks import __main__ as entry
from benchmarks import train_step, update_cost

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "report.json"
  proc = subprocess.run(
    [sys.executable, "-m", "benchmarks", "--quick", "--reps", "2", "--json", str(out)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout, json.loads(out.read_text())


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


def test_report_prints_every_section_and_row(quick_report):
  text, _ = quick_report
  for header in (
    "## 1. Update cost",
    "### ResNet-14-shaped tree",
    "### many-leaf tree",
    "## 2. Compile time",
    "## 3. Optimizer-state memory",
    "## 4. Train step",
    "## Targets",
  ):
    assert header in text
  assert "Device: **cpu" in text or "Device: **gpu" in text
  for name in update_cost.UPDATE_CONTENDERS:
    # Two update tables and the compile table.
    assert text.count(f"| {name} |") >= 4, name
  for name in update_cost.MEMORY_CONTENDERS:
    assert f"| {name} |" in text, name
  for name in list(train_step.TARGETS) + [train_step.BASELINE, "optax.contrib.sam"]:
    assert f"| {name} |" in text, name
  assert "| layer_sam dynamic (k=2) |" in text
  assert "| layer_sam static (output-side 2:" in text
  assert "skipped" not in text
  for target in ("update ≤ 0.6×", "compile ≤ 2.0×", "train step ≤ 1.03× SGD"):
    assert target in text


def test_json_is_complete(quick_report):
  _, results = quick_report
  sections = {"meta", "update", "compile", "memory", "train", "targets"}
  assert set(results) == {"command", "commit", "machine", *sections}
  assert results["command"].startswith("python -m benchmarks")
  assert results["meta"]["quick"] is True
  for tree in ("resnet50", "many_leaves"):
    rows = results["update"][tree]["rows"]
    assert list(rows) == list(update_cost.UPDATE_CONTENDERS)
    for row in rows.values():
      assert _finite(row["update"]["ratio"]) and row["update"]["ratio"] > 0
      assert len(row["update"]["samples_s"]) == 2
      assert row["compile"]["distinct_fusions"] <= row["compile"]["fusions"]
  base = results["update"]["resnet50"]["rows"][update_cost.BASELINE]
  assert base["update"]["ratio"] == 1.0
  for row in results["compile"]["rows"].values():
    assert _finite(row["compile"]["ratio"])
  memory = results["memory"]["resnet50"]["rows"]
  assert memory[update_cost.BASELINE]["ratio"] == 1.0
  # Adam keeps two moments; LGM (spatial) and DGS only per-layer scalars.
  num_params = results["memory"]["resnet50"]["params"]
  assert memory[update_cost.BASELINE]["bytes"] >= 8 * num_params
  assert memory["scale_by_lgm (spatial)"]["bytes"] < 100 * 161
  assert memory["scale_by_dgs (global)"]["bytes"] < 100
  train = results["train"]["rows"]
  assert len(train) == 8
  for row in train.values():
    assert _finite(row["step"]["ratio"]) and _finite(row["gflops"])
  assert len(results["targets"]) == 6
  assert all(isinstance(t["met"], bool) for t in results["targets"])


def test_flags():
  args = entry.parse_args(["--sizes", "leaves=200,resnet50_width=0.5", "--reps", "4"])
  assert args.sizes["leaves"] == 200 and args.sizes["resnet50_width"] == 0.5
  assert args.sizes["batch"] == 128 and args.reps == 4
  assert entry.parse_args(["--only", "memory,train"]).sections == ["memory", "train"]
  with pytest.raises(SystemExit):
    entry.parse_args(["--only", "nonsense"])
  with pytest.raises(SystemExit):
    entry.parse_args(["--sizes", "unknown=3"])
