"""Orbax checkpoints of `examples.train`: save, resume, and fall back on damage.

A checkpoint ``WORKDIR/checkpoints/STEP`` holds the arrays of the model and
the optimizer, and as JSON the run's `progress`. The last `KEEP` are kept, so
that a damaged latest one leaves the one before to resume from.
"""

import json
import os
import pathlib
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from examples.config import RESUME_KEYS, UsageError
from examples.optimizers import DEFAULT_RHOS

KEEP = 2
"""How many checkpoints are kept: the latest and the one before it."""


def _is_key(x: jax.Array) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def saveable(node: nnx.Module | nnx.Optimizer) -> dict:
  """The arrays of ``nnx.state(node)``, PRNG keys (of dropout) as raw data."""
  return jax.tree.map(
    lambda x: jax.random.key_data(x) if _is_key(x) else x,
    nnx.to_pure_dict(nnx.state(node)),
  )


def load(node: nnx.Module | nnx.Optimizer, saved: dict) -> None:
  """Puts arrays from `saveable` back into ``node`` (built afresh: its static parts)."""
  state = nnx.state(node)

  def wrap(x: jax.Array, y: jax.Array) -> jax.Array:  # Raw data back into a key.
    return jax.random.wrap_key_data(y, impl=jax.random.key_impl(x)) if _is_key(x) else y

  nnx.replace_by_pure_dict(state, jax.tree.map(wrap, nnx.to_pure_dict(state), saved))
  nnx.update(node, state)


def progress(step: int, metrics: dict, losses: Sequence, step_fn: Any) -> dict:
  """A checkpoint's JSON: the step, the metrics, the epoch's losses, the step's."""
  return {
    "step": step,
    "metrics": json.loads(json.dumps(metrics)),  # A copy: orbax writes later.
    "losses": [float(x) for x in jax.device_get(losses)],  # Exact.
    "step_fn": step_fn.state_dict(),  # `loop.Compilations` or a `StaticSelection`.
  }


class Checkpoints:
  """The orbax checkpoints of one run in ``directory``.

  Args:
    directory: where the checkpoints go.
    resume: keep existing checkpoints (to restore); if false, process 0
      deletes the folder first and every process waits for it.
  """

  def __init__(self, directory: str | os.PathLike[str], *, resume: bool):
    self.directory = pathlib.Path(directory)
    if not resume:
      if jax.process_index() == 0 and self.directory.exists():
        shutil.rmtree(self.directory)
      # Every process waits, whatever it saw: none may create the folder (the
      # manager below does) before process 0 has deleted it.
      ocp.multihost.sync_global_processes("checkpoints:delete")
    self.manager = ocp.CheckpointManager(
      self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=KEEP)
    )

  def save(self, model: nnx.Module, optimizer: nnx.Optimizer, progress: dict) -> None:
    """Writes a checkpoint (in the background) at step ``progress['step']``."""
    if self.manager.latest_step() == progress["step"]:
      return  # Written already: max_steps stopped on a checkpoint_every step.
    self.manager.save(
      progress["step"],
      args=ocp.args.Composite(
        model=ocp.args.StandardSave(saveable(model)),
        optimizer=ocp.args.StandardSave(saveable(optimizer)),
        progress=ocp.args.JsonSave(progress),
      ),
    )

  def resume(self, model, optimizer, step_fn, metrics, losses: list, config) -> int:
    """`restore`, and the run's step function, metrics and epoch's losses with it.

    Returns:
      The step to go on from (0 without a checkpoint).
    """
    if not (progress := self.restore(model, optimizer, config)):
      return 0
    losses[:] = map(np.float32, progress["losses"])
    metrics.resume(progress["metrics"], progress["step"])
    # Checkpoints written before the step function's state had its own key
    # hold StaticSelection's under "static_selection" (and {} for a plain step).
    if state := progress.get("step_fn", progress.get("static_selection")):
      step_fn.load_state_dict(state)
    return progress["step"]

  def restore(self, model: nnx.Module, optimizer: nnx.Optimizer, config) -> dict | None:
    """Loads the latest readable checkpoint; returns its `progress` (or ``None``).

    ``model`` and ``optimizer`` are built as at the start of the run. A
    checkpoint that cannot be read is reported, deleted, and the one before it
    tried; one written with other `RESUME_KEYS` settings than ``config``, or
    none readable, raises `UsageError`. Process 0 says where the run starts.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    target = {"model": saveable(model), "optimizer": saveable(optimizer)}
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    for step in steps:
      try:
        progress = self._read(step, progress=ocp.args.JsonRestore())["progress"]
        self._check(progress["metrics"]["config"], config)
        arrays = self._read(step, **{
          name: ocp.args.StandardRestore(tree) for name, tree in target.items()
        })  # fmt: skip
      except UsageError:
        raise
      except Exception as error:  # noqa: BLE001 Orbax raises many kinds.
        self._damaged(step, error)
        continue
      load(model, arrays["model"])
      load(optimizer, arrays["optimizer"])
      self._say(f"resuming {self.directory.parent} from step {step}")
      return progress
    if steps:
      raise UsageError(
        f"no checkpoint in {os.fspath(self.directory)!r} could be read; delete "
        "the folder or run without --resume to start over"
      )
    self._say(f"no checkpoint in {self.directory.parent}: starting from step 0")
    return None

  def _read(self, step: int, **items: Any) -> Any:
    return self.manager.restore(step, args=ocp.args.Composite(**items))

  def _check(self, saved: dict, config: Any) -> None:
    # The radius only where the optimizer has one: checkpoints written before
    # each optimizer had its own default hold rho=0.05 for sgd and the rest too.
    keys = [k for k in RESUME_KEYS if k != "rho" or config.optimizer in DEFAULT_RHOS]
    if changed := [k for k in keys if saved.get(k) != getattr(config, k)]:
      was = ", ".join(f"{k}={saved.get(k)!r}" for k in changed)
      now = ", ".join(f"{k}={getattr(config, k)!r}" for k in changed)
      raise UsageError(  # Before orbax reads arrays of another shape.
        f"cannot resume from {os.fspath(self.directory)!r}: it was written with "
        f"{was}; this run has {now} (run without --resume to start over)"
      )

  def _say(self, line: str) -> None:
    if jax.process_index() == 0:
      print(line)

  def _damaged(self, step: int, error: BaseException) -> None:
    lines = str(error).strip().splitlines()
    what = f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]
    print(
      f"checkpoint {step} in {os.fspath(self.directory)} is damaged ({what}); "
      "deleted, trying the one before", file=sys.stderr,
    )  # fmt: skip
    self.manager.delete(step)

  def close(self) -> None:
    """Waits for the checkpoints being written."""
    self.manager.close()
