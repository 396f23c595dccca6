"""Checkpoints and ``resume`` of examples/train.py.

A run stopped by ``max_steps`` inside an epoch and resumed must end exactly
where a run that was never stopped ends: same parameters, BatchNorm
statistics and optimizer state, bit for bit, and the same metrics.
"""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from examples import train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _config(data_dir, **kwargs):
  defaults = dict(
    batch_size=128,  # 11 steps per epoch of digits.
    data_dir=data_dir,
    eval_every=5,
    checkpoint_every=4,
    robustness=False,
    progress=False,
  )
  return train.Config(**{**defaults, **kwargs})


def _latest_checkpoint(workdir):
  """The step and the arrays of the latest checkpoint, as saved."""
  manager = ocp.CheckpointManager(workdir / train.CHECKPOINT_DIR)
  step = manager.latest_step()
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      model=ocp.args.StandardRestore(), optimizer=ocp.args.StandardRestore()
    ),
  )
  manager.close()
  return step, {"model": restored["model"], "optimizer": restored["optimizer"]}


def _without_throughput(history):
  return [{k: v for k, v in e.items() if k != "images_per_s"} for e in history]


@pytest.mark.parametrize(
  ("optimizer", "model", "epochs", "stop", "total"),
  [
    # LayerNames in the state; stops in epoch 2, goes on to the end.
    ("lgm", "cnn", 2, 15, None),
    # grad_fn; stops in epoch 1, goes on to the end.
    ("layer_sam", "cnn", 2, 7, None),
    # BatchNorm statistics; both runs end inside the epoch (ResNet is slow).
    ("sgd", "resnet20", 1, 3, 6),
  ],
)
def test_stopped_and_resumed_run_equals_uninterrupted_run(
  optimizer, model, epochs, stop, total, data_dir, tmp_path
):
  def run(workdir, **kwargs):
    config = _config(
      data_dir, optimizer=optimizer, model=model, epochs=epochs, **kwargs
    )
    return train.train_and_evaluate(config, tmp_path / workdir)

  whole = run("whole", max_steps=total)
  stopped = run("resumed", max_steps=stop)
  assert stopped["history"][-1]["step"] == stop
  assert _latest_checkpoint(tmp_path / "resumed")[0] == stop
  resumed = run("resumed", max_steps=total, resume=True)

  step, expected = _latest_checkpoint(tmp_path / "whole")
  assert step == (total or epochs * (1437 // 128))
  resumed_step, actual = _latest_checkpoint(tmp_path / "resumed")
  assert resumed_step == step
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  assert int(actual["optimizer"]["step"]) == step
  if model == "resnet20":
    assert "mean" in actual["model"]["bn"] and "var" in actual["model"]["bn"]
  jax.tree.map(np.testing.assert_array_equal, actual, expected)

  assert _without_throughput(resumed["history"]) == _without_throughput(
    whole["history"]
  )
  assert resumed["curve"] == whole["curve"]
  saved = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
  assert _without_throughput(saved["history"]) == _without_throughput(whole["history"])
  assert saved["curve"] == whole["curve"]


def test_saved_progress_is_not_changed_by_the_run(data_dir, tmp_path, monkeypatch):
  # Orbax writes the progress in the background, while the run goes on: the
  # lists handed to it must not be the run's own, which it appends to (the
  # entry of an epoch cut short comes right after its checkpoint).
  calls = []
  save = train._save

  def recording_save(manager, model, optimizer, progress):
    calls.append((progress, json.dumps(progress)))
    save(manager, model, optimizer, progress)

  monkeypatch.setattr(train, "_save", recording_save)
  train.train_and_evaluate(_config(data_dir, max_steps=7), tmp_path)
  assert [progress["step"] for progress, _ in calls] == [4, 7]
  for progress, at_call in calls:
    assert json.dumps(progress) == at_call


def test_resume_without_checkpoint_starts_from_scratch(data_dir, tmp_path):
  config = _config(data_dir, optimizer="lgm", epochs=1, max_steps=3, resume=True)
  results = train.train_and_evaluate(config, tmp_path)
  assert [e["step"] for e in results["history"]] == [3]
  assert _latest_checkpoint(tmp_path)[0] == 3


def test_run_without_resume_deletes_old_checkpoints(data_dir, tmp_path):
  train.train_and_evaluate(
    _config(data_dir, optimizer="lgm", epochs=1, max_steps=6), tmp_path
  )
  assert _latest_checkpoint(tmp_path)[0] == 6
  train.train_and_evaluate(
    _config(data_dir, optimizer="lgm", epochs=1, max_steps=2), tmp_path
  )
  steps = sorted(int(p.name) for p in (tmp_path / train.CHECKPOINT_DIR).iterdir())
  assert steps == [2]


def test_no_checkpoints(data_dir, tmp_path):
  config = _config(data_dir, optimizer="lgm", epochs=1, max_steps=5, checkpoints=False)
  train.train_and_evaluate(config, tmp_path)
  assert not list((tmp_path / train.CHECKPOINT_DIR).glob("*"))


def test_resume_rejects_other_settings(data_dir, tmp_path):
  train.train_and_evaluate(
    _config(data_dir, optimizer="lgm", epochs=1, max_steps=2), tmp_path
  )
  config = _config(data_dir, optimizer="lgm", epochs=1, seed=1, resume=True)
  with pytest.raises(ValueError, match=r"seed=0.*seed=1"):
    train.train_and_evaluate(config, tmp_path)


def test_checkpoint_round_trips_prng_state(tmp_path):
  # The models of examples.models keep no PRNG state; one with dropout would.
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(2, 3, rngs=rngs)
      self.dropout = nnx.Dropout(0.5, rngs=rngs)

  model = Model(nnx.Rngs(params=0, dropout=1))
  model.dropout(np.ones((4, 3), np.float32))  # Advances the dropout stream.
  manager = ocp.CheckpointManager(tmp_path)
  manager.save(0, args=ocp.args.StandardSave(train._saveable(model)))
  manager.wait_until_finished()
  fresh = Model(nnx.Rngs(params=5, dropout=6))
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, train._saveable(fresh))
  train._load(fresh, manager.restore(0, args=ocp.args.StandardRestore(target)))
  manager.close()

  jax.tree.map(
    np.testing.assert_array_equal,
    train._saveable(fresh),
    train._saveable(model),
  )
  key = fresh.dropout.rngs.key[...]
  assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  x = np.ones((8, 3), np.float32)
  np.testing.assert_array_equal(fresh.dropout(x), model.dropout(x))
