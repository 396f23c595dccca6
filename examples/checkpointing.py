"""Orbax checkpoints of `examples.train`: save, resume, and fall back on damage.

A checkpoint ``WORKDIR/checkpoints/STEP`` holds ``nnx.state(model)``
(parameters and BatchNorm statistics), ``nnx.state(optimizer)`` (the step
count and the optax state) and, as JSON, the run's progress: the step, the
losses of the current epoch, the metrics so far, the training time and the
host state of `optax_lgm.StaticSelection`. The last two checkpoints are kept,
so that a damaged latest one (a truncated or missing file) leaves the one
before: `Checkpoints.restore` reports the damage in one line, deletes the
damaged checkpoint and resumes from the previous one.
"""

import os
import pathlib
import shutil
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from examples.config import UsageError

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
  """Puts arrays from `saveable` back into ``node``.

  Only arrays are saved: the static parts of the optimizer state (such as the
  layer names of `optax_lgm.lgm`) come from ``node``, built afresh.
  """
  state = nnx.state(node)
  saved = jax.tree.map(
    lambda x, y: (
      jax.random.wrap_key_data(y, impl=jax.random.key_impl(x)) if _is_key(x) else y
    ),
    nnx.to_pure_dict(state),
    saved,
  )
  nnx.replace_by_pure_dict(state, saved)
  nnx.update(node, state)


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


class Checkpoints:
  """The orbax checkpoints of one run in ``directory``.

  Args:
    directory: where the checkpoints go.
    resume: keep existing checkpoints (to restore); if false, process 0
      deletes the folder first and every process waits for it.
    log: where the one-line messages go (default: standard error).
  """

  def __init__(
    self,
    directory: str | os.PathLike[str],
    *,
    resume: bool,
    log: Callable[[str], None] | None = None,
  ):
    self.directory = pathlib.Path(directory)
    self.log = log or (lambda line: print(line, file=sys.stderr))
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

  def restore(
    self,
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    config: Any,
    same: Sequence[str],
  ) -> dict | None:
    """Loads the latest readable checkpoint into ``model`` and ``optimizer``.

    A checkpoint that cannot be read is reported in one line and deleted, and
    the one before it is tried.

    Args:
      model: the model, built as at the start of the run.
      optimizer: its optimizer, built as at the start of the run.
      config: the settings of this run (a dataclass).
      same: the settings a checkpoint must share with ``config``; checked
        before any array is read.

    Returns:
      The ``progress`` given to `save`, or ``None`` if the folder holds no
      checkpoint.

    Raises:
      UsageError: if the checkpoint was written with other ``same`` settings,
        or if there were checkpoints but none could be read.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    target = jax.tree.map(
      ocp.utils.to_shape_dtype_struct,
      {"model": saveable(model), "optimizer": saveable(optimizer)},
    )
    for step in steps:
      try:
        progress = self.manager.restore(
          step, args=ocp.args.Composite(progress=ocp.args.JsonRestore())
        )["progress"]
      except Exception as error:  # noqa: BLE001 Orbax raises many kinds.
        self._damaged(step, error)
        continue
      saved = progress["metrics"]["config"]
      if changed := [k for k in same if saved[k] != getattr(config, k)]:
        raise UsageError(  # Before orbax reads arrays of another shape.
          f"cannot resume from {os.fspath(self.directory)!r}: it was written with "
          + ", ".join(f"{k}={saved[k]!r}" for k in changed)
          + "; this run has "
          + ", ".join(f"{k}={getattr(config, k)!r}" for k in changed)
          + " (run without --resume to start over)"
        )
      try:
        restored = self.manager.restore(
          step,
          args=ocp.args.Composite(
            model=ocp.args.StandardRestore(target["model"]),
            optimizer=ocp.args.StandardRestore(target["optimizer"]),
          ),
        )
      except Exception as error:  # noqa: BLE001
        self._damaged(step, error)
        continue
      load(model, restored["model"])
      load(optimizer, restored["optimizer"])
      return progress
    if steps:
      raise UsageError(
        f"no checkpoint in {os.fspath(self.directory)!r} could be read; delete "
        "the folder or run without --resume to start over"
      )
    return None

  def _damaged(self, step: int, error: BaseException) -> None:
    self.log(
      f"checkpoint {step} in {os.fspath(self.directory)} is damaged "
      f"({_first_line(error)}); deleted, trying the one before"
    )
    self.manager.delete(step)

  def close(self) -> None:
    """Waits for the checkpoints being written."""
    self.manager.close()
