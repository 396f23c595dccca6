"""What `examples.train` records in ``metrics.json``, and its training clock.

Training time follows AlgoPerf's rule: it runs from the first step,
compilation included, and stops during evaluations. ``time_to_target`` is the
training time at the first evaluation at or above the target accuracy.
"""

import dataclasses
import json
import pathlib
import time
from typing import Any

import numpy as np


def to_json(value: Any) -> Any:
  """Turns NumPy scalars and arrays (as in `optax_lgm.layer_stats`) into JSON."""
  if isinstance(value, dict):
    return {str(k): to_json(v) for k, v in value.items()}
  return np.asarray(value).tolist()


class Metrics:
  """The metrics of one run (``data``) and the training clock.

  Args:
    config: the run's settings (a dataclass).
    target_accuracy: the test accuracy of ``time_to_target``.
    **extra: further entries of ``data`` (such as the devices).
  """

  def __init__(self, config: Any, target_accuracy: float, **extra: Any):
    self.target_accuracy = target_accuracy
    self.data: dict[str, Any] = {
      "config": dataclasses.asdict(config),
      **extra,
      "history": [],
      "curve": [],
      "train_seconds": 0.0,
      "time_to_target": None,
      "steps_to_target": None,
    }
    self._started = None

  def start_clock(self) -> None:
    """Starts (or restarts) counting training time."""
    self._started = time.perf_counter()

  def stop_clock(self) -> float:
    """Adds the time since `start_clock`; returns the training time so far."""
    if self._started is not None:
      self.data["train_seconds"] += time.perf_counter() - self._started
      self._started = None
    return self.data["train_seconds"]

  def evaluated(self, step: int, accuracy: float) -> None:
    """Records a test accuracy at ``step`` (with the clock stopped)."""
    seconds = self.data["train_seconds"]
    curve = self.data["curve"]
    if not curve or curve[-1]["step"] != step:
      curve.append({"step": step, "test_accuracy": accuracy, "seconds": seconds})
    if self.data["time_to_target"] is None and accuracy >= self.target_accuracy:
      self.data["time_to_target"], self.data["steps_to_target"] = seconds, step

  def copy(self) -> dict[str, Any]:
    """A deep copy of ``data`` (for a checkpoint written in the background)."""
    return json.loads(json.dumps(self.data))

  def write(self, path: pathlib.Path) -> None:
    """Writes ``data`` as JSON."""
    path.write_text(json.dumps(self.data, indent=2))
