"""One training loop, one clock and one time to target, for examples and benchmarks.

`run` calls a step ``step(state, batch) -> (state, loss)`` for the steps of a
``range``, each fed ``data(step)``, so a resumed run starts at its step.
Training time follows AlgoPerf's rule: it runs from the first step,
compilation included, and stops while the model is evaluated. The time to
target is the training time at the first evaluation at or above the target
accuracy; in a median over seeds a miss counts as infinite.
"""

import json
import math
import pathlib
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import tqdm

import optax_lgm


def time_to_target(curve: Sequence[dict], target: float) -> tuple[Any, Any]:
  """``(seconds, step)`` of the first point at or above ``target``, or ``None``s."""
  for point in curve:
    if point["test_accuracy"] >= target:
      return point["seconds"], point["step"]
  return None, None


def median_time(seconds: Sequence[float | None]) -> float:
  """The median time to target over seeds, a miss (``None``) counting as infinite."""
  return float(np.median([math.inf if s is None else s for s in seconds] or [math.inf]))


def to_json(value: Any) -> Any:
  """Turns NumPy scalars and arrays into JSON values."""
  if isinstance(value, dict):
    return {str(k): to_json(v) for k, v in value.items()}
  return np.asarray(value).tolist()


def layer_stats(opt_state: Any) -> dict[str, Any]:
  """`optax_lgm.layer_stats` of ``opt_state``; ``{}`` for optimizers without any."""
  try:
    return to_json(optax_lgm.layer_stats(opt_state))
  except ValueError:  # sgd, adam, lars and sam keep no per-layer statistics.
    return {}


def summary(results: dict[str, Any]) -> str:
  """One line per history entry, the time to target, the robustness accuracies."""
  lines = [
    f"epoch {e['epoch']}: step {e['step']} loss {e['train_loss']:.4f} "
    f"test acc {e['test_accuracy']:.4f} {e['images_per_s']:.0f} images/s"
    for e in results["history"]
  ]
  if results["time_to_target"] is not None:
    lines.append(
      f"time to {results['config']['target_accuracy']:g}: "
      f"{results['time_to_target']:.1f} s (step {results['steps_to_target']})"
    )
  lines += [f"{name}: {value:.4f}" for name, value in results["robustness"].items()]
  return "\n".join(lines)


def commit() -> str | None:
  """The git commit of this checkout (``None`` outside a git checkout)."""
  here = str(pathlib.Path(__file__).parent)
  git = ["git", "-C", here, "rev-parse", "--short", "HEAD"]
  try:
    return subprocess.check_output(git, text=True, stderr=subprocess.DEVNULL).strip()
  except (OSError, subprocess.CalledProcessError):
    return None


class Compilations:
  """A jitted step that records its compilations, as `optax_lgm.StaticSelection`.

  The first call of each program in this process compiles it (or loads it
  from the persistent cache): its seconds count as compilation time.
  """

  def __init__(self, step: Callable[..., Any]):
    self.step, self.programs, self.seconds = step, set(), 0.0

  def __call__(self, *args: Any, **static: Any) -> Any:
    """Calls the step; ``static`` are its static arguments (a program each)."""
    began = time.perf_counter()
    outputs = self.step(*args, **static)
    if (program := tuple(static.items())) not in self.programs:
      self.programs.add(program)
      self.seconds += time.perf_counter() - began
    return outputs

  @property
  def compilations(self) -> int:
    """How many programs this process has run."""
    return len(self.programs)

  def log(self) -> dict[str, Any]:
    """The compile seconds, keyed as `optax_lgm.StaticSelection.log`'s."""
    seconds = {"critical": self.seconds, "background": 0.0}
    return {f"compile_seconds_{k}": v for k, v in seconds.items()}

  def state_dict(self) -> dict[str, Any]:
    """The compile seconds so far, for a checkpoint."""
    return {"seconds": [self.seconds]}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    """Goes on from the seconds of `state_dict`."""
    self.seconds = state["seconds"][0]

  def close(self) -> None:
    """Nothing to wait for (as `optax_lgm.StaticSelection.close`)."""


class Metrics:
  """What a run records (``data``, JSON) and its training clock.

  ``data`` holds ``history`` (`add_entry`), ``curve`` (per evaluation:
  ``step``, ``test_accuracy``, ``seconds`` of training so far),
  ``train_seconds``, ``time_to_target`` and ``steps_to_target`` (``None``
  until reached), and the ``extra`` entries (such as the settings).
  """

  def __init__(self, target_accuracy: float, **extra: Any):
    self.target_accuracy = target_accuracy
    self.data: dict[str, Any] = {
      **extra, "history": [], "curve": [], "train_seconds": 0.0,
      "time_to_target": None, "steps_to_target": None,
    }  # fmt: skip
    self._started: float | None = None
    self._since = (0, 0.0)  # The step and training time of the last entry.

  def record(self, step_fn: Any, skipped_steps: int) -> None:
    """Records the step function's compilations and the steps skipped."""
    log = step_fn.log()
    self.data["compile"] = {"compilations": step_fn.compilations} | {
      f"{k}_seconds": log[f"compile_seconds_{k}"] for k in ("critical", "background")
    }
    if isinstance(step_fn, optax_lgm.StaticSelection):
      self.data["layer_sam_static"] = log
    self.data["skipped_steps"] = skipped_steps

  def resume(self, data: dict[str, Any], step: int) -> None:
    """Goes on from ``data`` saved at ``step``; this run's ``config`` stays."""
    self.data = {**data, "config": self.data["config"]}
    self._since = (step, data["train_seconds"])

  def add_entry(
    self, step: int, epoch: int, batch_size: int, train_loss: float,
    test_accuracy: float, layer_stats: dict,
  ) -> None:  # fmt: skip
    """Appends the entry of ``step``, its images per second since the last entry."""
    steps, seconds = step - self._since[0], self.data["train_seconds"] - self._since[1]
    self.data["history"].append({
      "epoch": epoch, "step": step, "train_loss": train_loss,
      "test_accuracy": test_accuracy, "images_per_s": steps * batch_size / seconds,
      "layer_stats": layer_stats,
    })  # fmt: skip
    self._since = (step, self.data["train_seconds"])

  def start_clock(self) -> None:
    """Starts counting training time."""
    self._started = time.perf_counter()

  def stop_clock(self) -> float:
    """Adds the time since `start_clock`; returns the training time so far."""
    if self._started is not None:
      self.data["train_seconds"] += time.perf_counter() - self._started
      self._started = None
    return self.data["train_seconds"]

  def evaluated(self, step: int, accuracy: float) -> None:
    """Records a test accuracy at ``step`` (with the clock stopped)."""
    curve = self.data["curve"]
    if not curve or curve[-1]["step"] != step:
      seconds = self.data["train_seconds"]
      curve.append({"step": step, "test_accuracy": accuracy, "seconds": seconds})
    seconds, step = time_to_target(curve, self.target_accuracy)
    self.data["time_to_target"], self.data["steps_to_target"] = seconds, step

  def copy(self) -> dict[str, Any]:
    """A deep copy of ``data`` (for a checkpoint written in the background)."""
    return json.loads(json.dumps(self.data))

  def write(self, path: pathlib.Path) -> None:
    """Writes ``data`` as JSON."""
    path.write_text(json.dumps(self.data, indent=2))


def run(
  step: Callable[[Any, Any], tuple[Any, Any]],
  state: Any,
  data: Callable[[int], Any],
  steps: range,
  metrics: Metrics,
  *,
  evaluate: Callable[[Any], float],
  eval_at: Callable[[int], bool],
  evaluated: Callable[[int, Any], None] = lambda step, state: None,
  after_step: Callable[[int, Any, Any], None] = lambda step, state, loss: None,
  progress: str | None = None,
  stop_at_target: bool = False,
) -> Any:
  """Trains from ``steps.start`` to ``steps.stop``; returns the final state.

  Args:
    step: one training step, ``(state, batch) -> (state, loss)``.
    state: what the step starts from.
    data: the batch of a step (a function of the step alone).
    steps: the steps to run.
    metrics: its clock counts the steps; it records every evaluation.
    evaluate: the test accuracy of a state.
    eval_at: whether to evaluate after the step of this number (1-based).
    evaluated: called after an evaluation, off the clock (bookkeeping).
    after_step: called after each step (and its evaluation), on the clock.
    progress: the label of a progress bar (``None``: no bar).
    stop_at_target: stop after the evaluation that reaches the target.
  """
  bar = tqdm.tqdm(
    total=steps.stop, initial=steps.start, leave=False, desc=progress,
    disable=progress is None,
  )  # fmt: skip
  metrics.start_clock()
  for i in steps:
    state, loss = step(state, data(i))
    bar.update(1)
    if eval_at(i + 1):
      jax.block_until_ready(state)  # The steps are on the clock.
      metrics.stop_clock()
      accuracy = evaluate(state)
      metrics.evaluated(i + 1, accuracy)
      evaluated(i + 1, state)
      bar.set_postfix(acc=f"{accuracy:.3f}")
      metrics.start_clock()
      if stop_at_target and metrics.data["time_to_target"] is not None:
        break
    after_step(i + 1, state, loss)
  jax.block_until_ready(state)
  metrics.stop_clock()
  bar.close()
  return state
