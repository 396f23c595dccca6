"""What `examples.train` records in ``metrics.json``, and its training clock.

``metrics.json`` holds ``config`` (the settings as given), ``learning_rate``
(the rate actually used: ``config``'s, or the optimizer's default where that
is ``None``), ``devices`` (the size of the ``"data"``
axis and the number of processes), ``history`` (per epoch: ``epoch``,
``step``, ``train_loss``, ``test_accuracy``, ``images_per_s`` and the
``layer_stats`` of the optimizer state), ``curve`` (``step``,
``test_accuracy``, ``seconds``: the training time so far), ``train_seconds``,
``time_to_target`` and ``steps_to_target`` (``None`` until reached),
``skipped_steps`` (non-finite steps skipped), ``compile`` (programs
compiled for the training step, the compile seconds on the critical path and
in the background), ``layer_sam_static`` (compilations, selection, selection
changes and compile seconds of static ``layer_sam``),
``stopped`` (why the run stopped early, if it did), ``final_test_accuracy``
and ``robustness``.

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

import optax_lgm
from examples.optimizers import DEFAULT_LEARNING_RATES


def to_json(value: Any) -> Any:
  """Turns NumPy scalars and arrays into JSON values."""
  if isinstance(value, dict):
    return {str(k): to_json(v) for k, v in value.items()}
  return np.asarray(value).tolist()


def learning_rate_used(config: Any) -> float | None:
  """``config.learning_rate``, or the optimizer's default where it is ``None``.

  The default is `examples.optimizers.DEFAULT_LEARNING_RATES`, as in
  `examples.optimizers.make_optimizer`.
  """
  if config.learning_rate is not None:
    return config.learning_rate
  return DEFAULT_LEARNING_RATES.get(config.optimizer)


def layer_stats(opt_state: Any) -> dict[str, Any]:
  """`optax_lgm.layer_stats` of ``opt_state``; ``{}`` for optimizers without any."""
  try:
    return to_json(optax_lgm.layer_stats(opt_state))
  except ValueError:  # sgd, adam, lars and sam keep no per-layer statistics.
    return {}


def metrics_summary(results: dict[str, Any]) -> str:
  """One line per epoch, then the robustness accuracies, as the CLI prints them."""
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
      "learning_rate": learning_rate_used(config),
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
