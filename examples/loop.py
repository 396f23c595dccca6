"""One training loop, one clock and one time to target, for examples and benchmarks.

`run` feeds each step the batch of its number, so a resumed run starts at its
step; `Trainer` runs `examples.train` through it. Training time follows
AlgoPerf's rule: it runs from the first step, compilation included, and stops
while the model is evaluated. The time to target is the training time at the
first evaluation at or above the target accuracy; in a median over seeds a miss
counts as infinite.
"""

import dataclasses
import importlib.util
import json
import math
import pathlib
import subprocess
import sys
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import tqdm

import optax_lgm
from examples import checkpointing, robustness
from examples import config as config_lib
from examples.optimizers import NonFiniteError, nonfinite_steps


def time_to_target(curve: Sequence[dict], target: float) -> tuple[Any, Any]:
  """``(seconds, step)`` of the first point at or above ``target``, or ``None``s."""
  for point in curve:
    if point["test_accuracy"] >= target:
      return point["seconds"], point["step"]
  return None, None


def median_time(seconds: Sequence[float | None]) -> float:
  """The median time to target over seeds, a miss (``None``) counting as infinite."""
  return float(np.median([math.inf if s is None else s for s in seconds] or [math.inf]))


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
  git = ["git", "-C", pathlib.Path(__file__).parent, "rev-parse", "--short", "HEAD"]
  try:
    return subprocess.check_output(git, text=True, stderr=subprocess.DEVNULL).strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def docs_script(name: str) -> types.ModuleType:
  """``docs/<name>.py``: the one definition of the results page's tables or figures."""
  if name in sys.modules:
    return sys.modules[name]
  path = pathlib.Path(__file__).resolve().parents[1] / "docs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None or not path.exists():
    raise FileNotFoundError(f"{path} is missing: run from a checkout of the repository")
  module = sys.modules[name] = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class Compilations:
  """A jitted step that times its compilations, with `optax_lgm.StaticSelection`'s API.

  The first call with each set of static arguments compiles a program (or
  loads it from the persistent cache): its seconds count as compilation time.
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

  def log(self) -> dict[str, Any]:
    """The programs run and their compile seconds, keyed as ``StaticSelection``'s."""
    return {
      "compilations": len(self.programs), "compile_seconds_critical": self.seconds,
      "compile_seconds_background": 0.0,
    }  # fmt: skip

  def state_dict(self) -> dict[str, Any]:
    """The compile seconds so far, for a checkpoint."""
    return {"seconds": [self.seconds]}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    """Goes on from the seconds of `state_dict`."""
    self.seconds = state["seconds"][0]

  def close(self) -> None:
    """Nothing to wait for."""


class Metrics:
  """What a run records (``data``, JSON); `run` counts its training time.

  ``data`` holds ``history`` (empty here, see `Trainer`), ``curve`` (per
  evaluation: ``step``, ``test_accuracy``, ``seconds`` of training so far),
  ``train_seconds``, ``time_to_target`` and ``steps_to_target`` (``None``
  until reached), and the ``extra`` entries (such as the settings).
  """

  def __init__(self, target_accuracy: float, **extra: Any):
    self.target_accuracy = target_accuracy
    self.data: dict[str, Any] = {
      **extra, "history": [], "curve": [], "train_seconds": 0.0,
      "time_to_target": None, "steps_to_target": None,
    }  # fmt: skip

  def evaluated(self, step: int, accuracy: float) -> None:
    """Records a test accuracy at ``step`` (with the clock stopped)."""
    seconds, curve = self.data["train_seconds"], self.data["curve"]
    curve.append({"step": step, "test_accuracy": accuracy, "seconds": seconds})
    seconds, step = time_to_target(curve, self.target_accuracy)
    self.data["time_to_target"], self.data["steps_to_target"] = seconds, step


def run(
  step: Callable[[Any, Any], tuple[Any, Any]],
  state: Any,
  data: Callable[[int], Any],
  steps: range,
  metrics: Metrics,
  *,
  evaluate: Callable[[Any], float],
  eval_at: Callable[[int], bool],
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
    metrics: its ``train_seconds`` count the steps; its `Metrics.evaluated`
      records each evaluation, off the clock.
    evaluate: the test accuracy of a state.
    eval_at: whether to evaluate after the step of this number (1-based).
    after_step: called after each step (and its evaluation), on the clock.
    progress: the label of a progress bar (``None``: no bar).
    stop_at_target: stop after the evaluation that reaches the target.
  """
  with tqdm.tqdm(
    total=steps.stop, initial=steps.start, leave=False, desc=progress,
    disable=progress is None,
  ) as bar:  # fmt: skip
    began = time.perf_counter()
    for i in steps:
      state, loss = step(state, data(i))
      bar.update(1)
      if eval_at(i + 1):
        jax.block_until_ready(state)  # The steps are on the clock.
        metrics.data["train_seconds"] += time.perf_counter() - began
        accuracy = evaluate(state)
        metrics.evaluated(i + 1, accuracy)
        bar.set_postfix(acc=f"{accuracy:.3f}")
        began = time.perf_counter()
        if stop_at_target and metrics.data["time_to_target"] is not None:
          break
      after_step(i + 1, state, loss)
    jax.block_until_ready(state)
    metrics.data["train_seconds"] += time.perf_counter() - began
  return state


class Trainer(Metrics):
  """The run of `examples.train`: `run`, evaluations, metrics.json, checkpoints.

  Evaluates ``model`` on ``test``, adds an entry to ``data["history"]`` at each
  epoch's end, checkpoints (`examples.checkpointing`) and resumes, and stops
  after ``config.skip_nonfinite`` non-finite steps in a row (`NonFiniteError`).
  """

  def __init__(self, config, workdir, mesh, model, optimizer, step_fn, test: dict):
    used = config_lib.with_defaults(config)  # The learning rate and radius run.
    super().__init__(
      config.target_accuracy, config=dataclasses.asdict(config),
      learning_rate=used.learning_rate, rho=used.rho,
      devices={"data": mesh.devices.size, "processes": jax.process_count()},
      evaluated_on=config.evaluate_on,
    )  # fmt: skip
    self.config, self.model, self.optimizer = config, model, optimizer
    self.step_fn, self.test = step_fn, test
    self.path = pathlib.Path(workdir).resolve() / "metrics.json"
    self.path.parent.mkdir(parents=True, exist_ok=True)
    directory = self.path.parent / "checkpoints"
    self.checkpoints = checkpointing.Checkpoints(directory, resume=config.resume)
    self.losses: list = []  # The losses of this epoch so far.
    self._since = (0, 0.0)  # The step and training time of the last entry.

  def train(self, step: Callable[[int], Any], per_epoch: int, total: int) -> None:
    """Runs ``step(i)`` (step ``i`` from 0; returns its loss) up to ``total``."""
    config, self.per_epoch = self.config, per_epoch
    start = 0  # Or the step of the checkpoint resumed from.

    def one(state, i):
      self.losses.append(step(i))
      return state, self.losses[-1]

    try:
      if config.resume:
        start = self.checkpoints.resume(
          self.model, self.optimizer, self.step_fn, self, self.losses, config
        )
      self.model.train()
      run(
        one, (self.model, self.optimizer), lambda i: i, range(start, total), self,
        evaluate=lambda _: self.accuracy(), after_step=self._after_step,
        eval_at=lambda i: not i % per_epoch
        or bool(config.eval_every and not i % config.eval_every),
        progress=f"{config.optimizer} seed {config.seed}"
        if config.progress and jax.process_index() == 0 else None,
      )  # fmt: skip
      if total % per_epoch and start < total:  # Stopped inside an epoch: the
        self._save(total)  # checkpoint holds its losses, a resumed run writes it whole.
        self._end_epoch(total, self.accuracy())
        self.write()
    finally:
      self.checkpoints.close()  # Waits for the checkpoints being written.
      self.step_fn.close()
    history = self.data["history"]
    final = history[-1]["test_accuracy"] if history else self.accuracy()
    self.data[f"final_{config.evaluate_on}_accuracy"] = final
    self.data["robustness"] = {}

  def accuracy(self) -> float:
    """The accuracy of the model on ``test`` (left in training mode)."""
    accuracy = robustness.accuracy(self.model, self.test["image"], self.test["label"])
    self.model.train()
    return float(accuracy)

  def evaluated(self, step: int, accuracy: float) -> None:
    """`Metrics.evaluated`; at an epoch's end, its entry and a checkpoint too."""
    super().evaluated(step, accuracy)
    if not step % self.per_epoch:
      self._end_epoch(step, accuracy)
      self._save(step)
      self.checkpoints.manager.wait_until_finished()  # Keeps the save off the clock.
      self.write()

  def resume(self, data: dict[str, Any], step: int) -> None:
    """Goes on from ``data`` saved at ``step``; this run's ``config`` stays."""
    self.data = {**data, "config": self.data["config"]}
    self._since = (step, data["train_seconds"])

  def write(self) -> None:
    """Records the compilations and skipped steps; writes metrics.json (process 0)."""
    log = self.step_fn.log()
    self.data["compile"] = {"compilations": log["compilations"]} | {
      f"{k}_seconds": log[f"compile_seconds_{k}"] for k in ("critical", "background")
    }
    if isinstance(self.step_fn, optax_lgm.StaticSelection):
      self.data["layer_sam_static"] = log
    self.data["skipped_steps"] = nonfinite_steps(self.optimizer.opt_state)[1]
    if jax.process_index() == 0:
      self.path.write_text(json.dumps(self.data, indent=2))

  def _end_epoch(self, step: int, accuracy: float) -> None:  # Or the part that ran.
    try:
      stats = optax_lgm.layer_stats(self.optimizer.opt_state)  # JSON already.
    except ValueError:  # sgd, adam, lars and sam keep no per-layer statistics.
      stats = {}
    steps, seconds = step - self._since[0], self.data["train_seconds"] - self._since[1]
    self.data["history"].append({
      "epoch": -(-step // self.per_epoch), "step": step,
      "train_loss": float(np.nanmean(jax.device_get(self.losses))),  # Skipped: NaN.
      "test_accuracy": accuracy,
      "images_per_s": steps * self.config.batch_size / seconds,
      "layer_stats": stats,
    })  # fmt: skip
    self._since = (step, self.data["train_seconds"])
    self.losses.clear()

  def _save(self, step: int) -> None:
    if self.config.checkpoints:
      progress = checkpointing.progress(step, self.data, self.losses, self.step_fn)
      self.checkpoints.save(self.model, self.optimizer, progress)

  def _after_step(self, step: int, state: Any, loss: Any) -> None:
    limit = self.config.skip_nonfinite
    if limit and nonfinite_steps(self.optimizer.opt_state)[0] >= limit:
      self.data["stopped"] = (
        f"stopped at step {step}: {limit} steps in a row had a non-finite "
        "gradient; lower --learning_rate or check the data"
      )
      self.write()
      raise NonFiniteError(self.data["stopped"])
    if self.config.checkpoint_every and not step % self.config.checkpoint_every:
      self._save(step)  # Not again at an epoch's end (Checkpoints.save skips it).
