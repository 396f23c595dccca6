"""Killed runs and damaged checkpoints: ``--resume`` ends where no fault was.

The trainer runs as a subprocess of its CLI (``python -m examples.train``) on
a tiny run (the digits CNN, 2 epochs of 11 steps, a checkpoint every 2 steps).
Each trial injects faults into one run, then resumes it with ``--resume``
until it finishes, and checks that it ends with the parameters and optimizer
state (bit for bit) and the metrics (throughput and timings aside) of a run
that was never interrupted:

* ``random``: SIGKILL at a moment drawn uniformly over the length of an
  uninterrupted run;
* ``write``: SIGKILL as soon as a checkpoint is being written (orbax's
  temporary folder appears in ``WORKDIR/checkpoints``);
* several kills in a row (the resumed run is killed again).

`test_damaged_checkpoint_falls_back` truncates or deletes files of the latest
checkpoint of a stopped run: the resumed run reports it in one line, goes on
from the checkpoint before, and ends as above, without a traceback.

The trials are seeded. By default two run (six trainer processes, two to
three minutes on two busy cores); ``OPTAX_LGM_SLOW=1`` runs the others and
``OPTAX_LGM_FAULT_TRIALS`` (default 40) trials of random faults, and prints
the counts (the reliability figures of the results page).
"""

import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from _checkpoints import read_checkpoint, without_times

ROOT = pathlib.Path(__file__).resolve().parents[1]

SLOW = os.environ.get("OPTAX_LGM_SLOW", "") not in ("", "0")
"""Whether to run the many-trials version."""

SETTINGS = (
  "--optimizer=sgd",
  "--epochs=2",
  "--batch_size=128",
  "--checkpoint_every=2",
  "--no_robustness",
  "--no_progress",
)
"""The run of every trial: 22 steps, checkpoints every 2 steps."""


def _command(data_dir: str, workdir: pathlib.Path, *extra: str) -> list[str]:
  return [
    sys.executable,
    "-m",
    "examples.train",
    *SETTINGS,
    f"--data_dir={data_dir}",
    f"--workdir={workdir}",
    *extra,
  ]


def _start(command: list[str]) -> subprocess.Popen:
  return subprocess.Popen(
    command,
    cwd=ROOT,
    env={**os.environ, "XLA_FLAGS": ""},
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _finish(command: list[str]) -> str:
  """Runs ``command`` to its end; returns its output; it must succeed."""
  process = _start(command)
  output = process.communicate(timeout=600)[0]
  assert process.returncode == 0, output[-3000:]
  assert "Traceback" not in output, output[-3000:]
  return output


def _writing(folder: pathlib.Path) -> bool:
  """Whether orbax is writing a checkpoint (its temporary folder exists)."""
  try:
    return any("tmp" in entry.name for entry in os.scandir(folder))
  except FileNotFoundError:
    return False


def _kill(command: list[str], kind: str, rng: random.Random, length: float) -> str:
  """Runs ``command`` and SIGKILLs it as ``kind`` says.

  Returns:
    What happened: ``"killed at random"``, ``"killed in a write"``, or
    ``"finished first"`` (the run ended before the fault came).
  """
  workdir = next(arg for arg in command if arg.startswith("--workdir="))
  folder = pathlib.Path(workdir.split("=", 1)[1]) / "checkpoints"
  process = _start(command)
  deadline = time.monotonic() + rng.uniform(0.0, length)
  # Skip the first few writes at times, so that later ones are hit too.
  writes_to_skip = rng.randrange(4) if kind == "write" else 0
  was_writing = False
  try:
    while process.poll() is None:
      if kind == "random" and time.monotonic() >= deadline:
        process.kill()
        process.wait()
        return "killed at random"
      if kind == "write":
        writing = _writing(folder)
        if writing and not was_writing:
          if writes_to_skip == 0:
            process.kill()
            process.wait()
            return "killed in a write"
          writes_to_skip -= 1
        was_writing = writing
      time.sleep(0.001)
  finally:
    process.kill()
    output = process.communicate()[0]
  assert process.returncode == 0, output[-3000:]
  return "finished first"


def _outcome(workdir: pathlib.Path):
  """What a finished run leaves: its step, arrays and metrics."""
  step, arrays = read_checkpoint(workdir)
  metrics = json.loads((workdir / "metrics.json").read_text())
  metrics = without_times(metrics)
  metrics["config"].pop("resume", None)
  return step, arrays, metrics


def _assert_same(workdir: pathlib.Path, reference) -> None:
  step, arrays, metrics = _outcome(workdir)
  expected_step, expected_arrays, expected_metrics = reference
  assert step == expected_step
  assert arrays.keys() == expected_arrays.keys()
  for key, value in expected_arrays.items():
    np.testing.assert_array_equal(arrays[key], value, err_msg=key)
  assert metrics == expected_metrics


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run: its data dir, outcome and wall-clock length."""
  root = tmp_path_factory.mktemp("faults")
  data_dir = str(root / "tfds")
  start = time.monotonic()
  _finish(_command(data_dir, root / "reference"))  # Also prepares the data.
  length = time.monotonic() - start
  return data_dir, _outcome(root / "reference"), length


def _trial(kinds, seed, reference, workdir) -> list[str]:
  """Kills one run as ``kinds`` says, resumes it to the end, checks it."""
  data_dir, expected, length = reference
  rng = random.Random(seed)
  command = _command(data_dir, workdir)
  happened = []
  for kind in kinds:
    happened.append(_kill(command, kind, rng, length))
    command = _command(data_dir, workdir, "--resume")
  _finish(command)
  _assert_same(workdir, expected)
  return happened


def _slow(*values):
  """A parameter that runs only with ``OPTAX_LGM_SLOW=1``."""
  skip = pytest.mark.skipif(not SLOW, reason="run with OPTAX_LGM_SLOW=1")
  return pytest.param(*values, marks=skip)


@pytest.mark.parametrize(
  ("kinds", "seed"),
  [
    (("random", "write"), 3),  # Twice in a row: at random, then in a write.
    _slow(("random",), 0),
    _slow(("write",), 1),
    _slow(("write", "write"), 2),
  ],
)
def test_killed_run_resumes_to_the_same_end(kinds, seed, reference, tmp_path):
  happened = _trial(kinds, seed, reference, tmp_path / "run")
  print(kinds, "->", happened)
  if "write" in kinds:  # Every run writes checkpoints.
    assert happened[kinds.index("write")] == "killed in a write", happened


DAMAGES = ("delete_model", "delete_progress", "truncate_array_file")
"""Ways `_damage` breaks a checkpoint."""

TRUNCATED_ISSUE = (
  "a truncated array file is reported in one line and the run goes on from "
  "the checkpoint before, but orbax's other reads of that checkpoint, left "
  "pending, at times print 'Exception ignored in: <coroutine ...>' and a "
  "traceback as they are collected (not strict: it comes and goes)"
)


def _damage(checkpoint: pathlib.Path, how: str) -> None:
  if how == "truncate_array_file":
    files = [p for p in (checkpoint / "model").rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
  elif how == "delete_model":
    shutil.rmtree(checkpoint / "model")
  elif how == "delete_progress":
    shutil.rmtree(checkpoint / "progress")
  else:
    raise ValueError(f"unknown damage how={how!r}")


@pytest.mark.parametrize("how", [DAMAGES[0], *(_slow(how) for how in DAMAGES[1:])])
def test_damaged_checkpoint_falls_back(how, reference, tmp_path):
  data_dir, expected, _ = reference
  workdir = tmp_path / "run"
  _finish(_command(data_dir, workdir, "--max_steps=8"))  # Keeps steps 6 and 8.
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
  assert steps == [6, 8], steps
  _damage(workdir / "checkpoints" / "8", how)
  output = _finish(_command(data_dir, workdir, "--resume"))
  reported = [line for line in output.splitlines() if " is damaged" in line]
  assert len(reported) == 1, output[-3000:]
  assert "8" in reported[0], reported
  assert "from step 6" in output, output[-3000:]
  _assert_same(workdir, expected)


@pytest.mark.skipif(not SLOW, reason="run with OPTAX_LGM_SLOW=1")
def test_many_random_faults(reference, tmp_path):
  trials = int(os.environ.get("OPTAX_LGM_FAULT_TRIALS", "40"))
  rng = random.Random(2026)
  counts = {"trials": 0, "ended equal": 0}
  for trial in range(trials):
    kinds = tuple(rng.choice(("random", "write")) for _ in range(rng.randint(1, 3)))
    happened = _trial(kinds, trial, reference, tmp_path / f"trial{trial}")
    counts["trials"] += 1
    counts["ended equal"] += 1  # _trial raised otherwise.
    for event in happened:
      counts[event] = counts.get(event, 0) + 1
    print(f"trial {trial}: {kinds} -> {happened}", flush=True)
  print("counts:", json.dumps(counts))
  assert counts["ended equal"] == trials
