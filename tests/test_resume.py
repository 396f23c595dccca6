"""Checkpoints and ``resume`` of examples/train.py.

A run stopped by ``max_steps`` inside an epoch and resumed must end exactly
where a run that was never stopped ends: same parameters, BatchNorm
statistics and optimizer state, bit for bit, and the same metrics.
"""

import dataclasses
import json
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _checkpoints import without_times
from flax import nnx

from examples import checkpointing, train
from examples.config import UsageError


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


CHECKPOINTS = "checkpoints"


def _latest_checkpoint(workdir):
  """The step and the arrays of the latest checkpoint, as saved."""
  manager = ocp.CheckpointManager(workdir / CHECKPOINTS)
  step = manager.latest_step()
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      model=ocp.args.StandardRestore(), optimizer=ocp.args.StandardRestore()
    ),
  )
  manager.close()
  return step, {"model": restored["model"], "optimizer": restored["optimizer"]}


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
    if optimizer == "layer_sam":  # Decisions from the optimizer state alone;
      # a dynamic start, so that the selection changes (the CNN's output-side
      # start is already its top two layers).
      kwargs.update(
        layer_sam_compile="foreground", layer_sam_payoff=0.0, layer_sam_start="dynamic"
      )
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

  for key in ("history", "curve", "steps_to_target", "layer_sam_static"):
    assert without_times(resumed.get(key)) == without_times(whole.get(key)), key
  if optimizer == "layer_sam":  # Static mode: the selection's host state too.
    assert whole["layer_sam_static"]["selection_changes"]
  saved = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
  assert without_times(saved["history"]) == without_times(whole["history"])
  assert without_times(saved["curve"]) == without_times(whole["curve"])


def test_saved_progress_is_not_changed_by_the_run(data_dir, tmp_path, monkeypatch):
  # Orbax writes the progress in the background, while the run goes on: the
  # lists handed to it must not be the run's own, which it appends to (the
  # entry of an epoch cut short comes right after its checkpoint).
  calls = []
  save = checkpointing.Checkpoints.save

  def recording_save(self, model, optimizer, progress):
    calls.append((progress, json.dumps(progress)))
    save(self, model, optimizer, progress)

  monkeypatch.setattr(checkpointing.Checkpoints, "save", recording_save)
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
  steps = sorted(int(p.name) for p in (tmp_path / CHECKPOINTS).iterdir())
  assert steps == [2]


def test_no_checkpoints(data_dir, tmp_path):
  config = _config(data_dir, optimizer="lgm", epochs=1, max_steps=5, checkpoints=False)
  train.train_and_evaluate(config, tmp_path)
  assert not list((tmp_path / CHECKPOINTS).glob("*"))


def test_resume_rejects_other_settings(data_dir, tmp_path):
  train.train_and_evaluate(
    _config(data_dir, optimizer="lgm", epochs=1, max_steps=2), tmp_path
  )
  config = _config(data_dir, optimizer="lgm", epochs=1, seed=1, resume=True)
  with pytest.raises(ValueError, match=r"seed=0.*seed=1.*without --resume"):
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
  manager.save(0, args=ocp.args.StandardSave(checkpointing.saveable(model)))
  manager.wait_until_finished()
  fresh = Model(nnx.Rngs(params=5, dropout=6))
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, checkpointing.saveable(fresh))
  checkpointing.load(fresh, manager.restore(0, args=ocp.args.StandardRestore(target)))
  manager.close()

  jax.tree.map(
    np.testing.assert_array_equal,
    checkpointing.saveable(fresh),
    checkpointing.saveable(model),
  )
  key = fresh.dropout.rngs.key[...]
  assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  x = np.ones((8, 3), np.float32)
  np.testing.assert_array_equal(fresh.dropout(x), model.dropout(x))


def _damage(checkpoint, how):
  """Truncates every file of the model's arrays, or removes the optimizer's."""
  if how == "missing":
    for path in sorted((checkpoint / "optimizer").rglob("*"), reverse=True):
      path.rmdir() if path.is_dir() else path.unlink()
    return
  files = [p for p in (checkpoint / "model").rglob("*") if p.is_file()]
  assert files
  for path in files:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_damaged_latest_checkpoint_resumes_from_the_one_before(
  how, data_dir, tmp_path, capsys
):
  def run(workdir, **kwargs):
    config = _config(data_dir, optimizer="lgm", epochs=1, eval_every=0, **kwargs)
    return train.train_and_evaluate(config, tmp_path / workdir)

  whole = run("whole")
  run("damaged", max_steps=8)  # Checkpoints at steps 4 and 8.
  _damage(tmp_path / "damaged" / CHECKPOINTS / "8", how)
  capsys.readouterr()
  resumed = run("damaged", resume=True)
  lines = capsys.readouterr().err.strip().splitlines()
  damaged = [line for line in lines if "damaged" in line]
  assert len(damaged) == 1 and "checkpoint 8 " in damaged[0], lines
  assert "Traceback" not in "\n".join(lines)
  # Resumed from step 4, so it ends as the uninterrupted run.
  assert without_times(resumed["history"]) == without_times(whole["history"])
  step, expected = _latest_checkpoint(tmp_path / "whole")
  assert _latest_checkpoint(tmp_path / "damaged")[0] == step
  jax.tree.map(
    np.testing.assert_array_equal, _latest_checkpoint(tmp_path / "damaged")[1], expected
  )


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(data_dir, tmp_path):
  config = _config(data_dir, optimizer="lgm", epochs=1, max_steps=4, checkpoint_every=2)
  train.train_and_evaluate(config, tmp_path)
  for step in (2, 4):
    _damage(tmp_path / CHECKPOINTS / str(step), "truncated")
  with pytest.raises(ValueError, match="no checkpoint .* could be read"):
    train.train_and_evaluate(dataclasses.replace(config, resume=True), tmp_path)


def test_orbax_keeps_two_checkpoints(data_dir, tmp_path):
  config = _config(
    data_dir, optimizer="lgm", epochs=1, max_steps=10, checkpoint_every=2
  )
  train.train_and_evaluate(config, tmp_path)
  steps = sorted(int(p.name) for p in (tmp_path / CHECKPOINTS).iterdir())
  assert steps == [8, 10] and checkpointing.KEEP == 2


@pytest.mark.parametrize(
  "key, saved, loaded",
  [
    ("step_fn", {"seconds": [1.5]}, [{"seconds": [1.5]}]),
    # Written before the step function's state had its own key.
    ("static_selection", {"selection": [0, 2]}, [{"selection": [0, 2]}]),
    ("static_selection", {}, []),  # A plain step: nothing to load.
  ],
)
def test_resume_loads_the_step_functions_state_under_either_key(
  key, saved, loaded, tmp_path, monkeypatch
):
  progress = {"step": 7, "losses": [0.5], "metrics": {"train_seconds": 2.0}, key: saved}
  checkpoints = checkpointing.Checkpoints(tmp_path, resume=True)
  monkeypatch.setattr(checkpoints, "restore", lambda *args: progress)
  calls = []
  step_fn = types.SimpleNamespace(load_state_dict=calls.append)
  metrics, losses = types.SimpleNamespace(resume=lambda data, step: None), []
  try:
    assert checkpoints.resume(None, None, step_fn, metrics, losses, None) == 7
  finally:
    checkpoints.close()
  assert calls == loaded and losses == [np.float32(0.5)]


@pytest.mark.parametrize(
  ("optimizer", "changes", "refused"),
  [
    ("sgd", {}, None),
    ("sgd", {"batch_size": 32}, "batch_size=64"),
    # Written before each optimizer had its own radius: 0.05 for all of them.
    ("sgd", {"rho": None}, None),
    ("sam", {"rho": 0.05}, None),
    ("layer_sam", {"rho": 0.01}, "rho=0.05"),
  ],
)
def test_a_checkpoint_of_other_settings_is_refused(
  tmp_path, optimizer, changes, refused
):
  written = train.Config(optimizer=optimizer, batch_size=64, rho=0.05)
  saved, config = dataclasses.asdict(written), dataclasses.replace(written, **changes)
  checkpoints = checkpointing.Checkpoints(tmp_path, resume=True)
  try:
    if refused is None:
      checkpoints._check(saved, config)
    else:
      with pytest.raises(UsageError, match=refused):
        checkpoints._check(saved, config)
  finally:
    checkpoints.close()
