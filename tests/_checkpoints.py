"""Reads a trainer checkpoint as plain NumPy arrays (tests of faults and processes)."""

import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp


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
