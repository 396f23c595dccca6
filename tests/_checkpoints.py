"""A trainer checkpoint as plain NumPy arrays, and metrics without their times."""

import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

TIMING_KEYS = ("images_per_s", "seconds", "time")
"""Metrics that hold wall-clock measurements (keys containing these)."""


def without_times(value):
  """``value`` (JSON) without the entries that measure wall-clock time."""
  if isinstance(value, dict):
    return {
      k: without_times(v)
      for k, v in value.items()
      if not any(word in k for word in TIMING_KEYS)
    }
  if isinstance(value, list):
    return [without_times(v) for v in value]
  return value


def read_checkpoint(workdir: pathlib.Path) -> tuple[int, dict[str, np.ndarray]]:
  """The latest checkpoint's model and optimizer arrays, as NumPy, by path.

  Read as plain arrays, whatever devices wrote them.
  """
  folder = workdir / "checkpoints"
  step = max(int(p.name) for p in folder.iterdir() if p.name.isdigit())
  arrays = {}
  for item in ("model", "optimizer"):
    checkpointer = ocp.PyTreeCheckpointer()
    path = folder / str(step) / item
    tree = checkpointer.metadata(path).item_metadata.tree
    as_numpy = ocp.RestoreArgs(restore_type=np.ndarray)
    restore_args = jax.tree.map(lambda _, a=as_numpy: a, tree)
    restored = checkpointer.restore(path, restore_args=restore_args)
    for key, value in jax.tree_util.tree_flatten_with_path(restored)[0]:
      arrays[item + jax.tree_util.keystr(key)] = np.asarray(value)
  return step, arrays
