"""Trains examples/train.py on a simulated 8-device mesh; used by test_examples_train.

Run in its own process with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
so that the rest of the suite keeps one device, from the repository root::

  PYTHONPATH=.:tests python -m _mesh_train DATA_DIR ROOT

Writes the runs ``ROOT/eight`` (4 steps) and ``ROOT/moved`` (2 steps), which
the test compares with a run on one device. Prints ``ok NAME`` for each check
that passes; exits non-zero at the first that fails.
"""

import dataclasses
import pathlib
import sys

import jax
import numpy as np

from examples import distributed, train


def config(data_dir) -> train.Config:
  """The settings of the 8-device runs, and of the test's one-device run."""
  return train.Config(
    optimizer="sgd",
    epochs=1,
    batch_size=128,
    max_steps=4,
    checkpoint_every=2,
    data_dir=data_dir,
    robustness=False,
    progress=False,
  )


def main(data_dir, root):
  assert jax.device_count() == 8, jax.devices()
  mesh = distributed.make_mesh()
  assert mesh.devices.size == 8
  batch = {"image": np.zeros((128, 8, 8, 1), np.float32)}
  sharded = distributed.shard_batch(batch, mesh)["image"]
  assert len(sharded.addressable_shards) == 8
  assert {s.data.shape for s in sharded.addressable_shards} == {(16, 8, 8, 1)}
  print("ok batch split over 8 devices")

  def run(name, **kwargs):
    settings = dataclasses.replace(config(data_dir), **kwargs)
    return train.train_and_evaluate(settings, root / name)

  run("eight")
  run("moved", max_steps=2)
  print("ok trained on 8 devices")

  try:
    run("bad", batch_size=100)
  except ValueError as error:
    assert "batch_size=100" in str(error) and "'auto'" in str(error), error
  else:
    raise AssertionError("batch_size=100 on 8 devices did not raise")
  print("ok batch_size check")


if __name__ == "__main__":
  main(sys.argv[1], pathlib.Path(sys.argv[2]))
