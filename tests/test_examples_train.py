"""End-to-end smoke tests of examples/train.py and examples/compare.py."""

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import _mesh_train  # tests/_mesh_train.py: the 8-device side of the mesh test.
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from examples import checkpointing, compare, distributed, input_pipeline, models, train
from examples.optimizers import OPTIMIZERS, make_optimizer

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_train_and_evaluate_one_epoch(name, data_dir, tmp_path):
  config = train.Config(
    optimizer=name,
    epochs=1,
    batch_size=128,
    data_dir=data_dir,
    robustness=name == "sgd",  # The robustness code is the same for all.
    eps_list=(0.1,),
    sigmas=(0.1,),
    pgd_steps=2,
    progress=False,
  )
  results = train.train_and_evaluate(config, tmp_path)
  (entry,) = results["history"]
  assert entry["step"] == 1437 // 128
  assert 0.0 <= entry["test_accuracy"] <= 1.0
  assert math.isfinite(entry["train_loss"]), entry
  assert entry["images_per_s"] > 0
  if name == "lgm":
    assert "lgm_scale" in entry["layer_stats"]
  if name == "layer_sam":
    counts = entry["layer_stats"]["sam_selected_count"]
    assert sum(counts.values()) == 2 * entry["step"]  # k=2 layers per step.
  if name == "sgd":
    assert set(results["robustness"]) == {"clean", "fgsm@0.1", "pgd@0.1", "noise@0.1"}
  saved = json.loads((tmp_path / "metrics.json").read_text())
  assert saved["history"][0]["step"] == entry["step"]


def _flat(tree):
  """``{path: array}`` of a nested dict."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def _create(config):
  """The model and optimizer of a run, initialised as train_and_evaluate does."""
  meta = input_pipeline.get_metadata(config.dataset)
  model = models.create_model(
    config.model,
    meta.num_classes,
    meta.input_shape,
    meta.mean,
    meta.std,
    nnx.Rngs(jax.random.key(config.seed, impl="rbg")),
  )
  tx = make_optimizer(config.optimizer, config.learning_rate, model.layer_axes)
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def _latest_checkpoint(workdir, config):
  """The step and the arrays of the latest checkpoint, on this process's device."""
  model, optimizer = _create(config)
  target = {
    "model": checkpointing.saveable(model),
    "optimizer": checkpointing.saveable(optimizer),
  }
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  manager = ocp.CheckpointManager(workdir / "checkpoints")
  step = manager.latest_step()
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      model=ocp.args.StandardRestore(target["model"]),
      optimizer=ocp.args.StandardRestore(target["optimizer"]),
    ),
  )
  manager.close()
  return step, {"model": restored["model"], "optimizer": restored["optimizer"]}


def _assert_trained(results, config, workdir, steps):
  """A few steps ran, were recorded, and moved every array of the model."""
  (entry,) = results["history"]
  assert entry["step"] == steps
  assert math.isfinite(entry["train_loss"]), entry
  assert 0.0 <= entry["test_accuracy"] <= 1.0
  saved = json.loads((workdir / "metrics.json").read_text())
  assert saved["history"][0]["step"] == steps
  assert saved["history"][0]["train_loss"] == entry["train_loss"]

  step, restored = _latest_checkpoint(workdir, config)
  assert step == steps
  assert int(restored["optimizer"]["step"]) == steps
  initial, _ = _create(config)
  initial = _flat(nnx.to_pure_dict(nnx.state(initial)))
  trained = _flat(restored["model"])
  assert initial.keys() == trained.keys()
  for name, value in trained.items():
    assert value.shape == initial[name].shape, name
    assert np.all(np.isfinite(value)), name
    assert not np.array_equal(value, initial[name]), f"{name} did not change"


def _train_two_steps(model, optimizer, data_dir, workdir):
  """Two steps of ``model`` on digits, checked with `_assert_trained`."""
  config = train.Config(
    model=model,
    optimizer=optimizer,
    epochs=1,
    max_steps=2,
    batch_size=128,
    data_dir=data_dir,
    robustness=False,
    progress=False,
  )
  results = train.train_and_evaluate(config, workdir)
  _assert_trained(results, config, workdir, steps=2)
  return results


@pytest.mark.parametrize("model", models.MODELS)
def test_each_model_trains_a_few_steps_on_digits(model, data_dir, tmp_path):
  _train_two_steps(model, "sgd", data_dir, tmp_path)


def test_stacked_transformer_trains_with_a_layer_per_block(data_dir, tmp_path):
  # The trainer passes model.layer_axes on: each stacked block is
  # a layer of its own, as each block of the unstacked model is.
  names = {}
  for model in ("transformer", "transformer_stacked"):
    results = _train_two_steps(model, "layer_sam", data_dir, tmp_path / model)
    names[model] = sorted(results["history"][-1]["layer_stats"]["sam_grad_norm"])
  depth = 2  # TransformerClassifier's default.
  assert len(names["transformer_stacked"]) == len(names["transformer"])
  per_block = [n for n in names["transformer_stacked"] if n.startswith("blocks/")]
  assert per_block and {n[-3:] for n in per_block} == {f"[{i}]" for i in range(depth)}


def _readable_mock(source):
  # TFDS 4.9.10's `mock_data` sets `__getitems__` on its mock array_record
  # reader as a plain attribute, so it is called without `self` and fails.
  # Read the mock item by item instead (as tests/test_input_pipeline.py does).
  reader = source.data_source
  reader.__getitems__ = lambda keys: [reader[k] for k in keys]
  return source


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_a_few_steps_on_mock_tfds_data(dataset, tmp_path, monkeypatch):
  get_datasets = input_pipeline.get_datasets

  def readable_get_datasets(*args, **kwargs):
    train_source, test_source, meta = get_datasets(*args, **kwargs)
    return _readable_mock(train_source), _readable_mock(test_source), meta

  monkeypatch.setattr(input_pipeline, "get_datasets", readable_get_datasets)
  config = train.Config(
    dataset=dataset,
    model="cnn",  # ResNet-20 adds about 12 s of compilation on 2 CPU cores.
    optimizer="sgd",
    epochs=1,
    batch_size=32,  # 2 steps of the 64 mock examples.
    data_dir=str(tmp_path / "tfds"),
    robustness=False,
    progress=False,
  )
  with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
    results = train.train_and_evaluate(config, tmp_path / "workdir")
  _assert_trained(results, config, tmp_path / "workdir", steps=2)


def test_main_stops_and_resumes(data_dir, tmp_path, capsys):
  args = [
    "--optimizer=lgm",
    "--epochs=1",
    "--batch_size=128",
    "--checkpoint_every=2",
    "--no_robustness",
    "--mesh=data=1",
    f"--data_dir={data_dir}",
    f"--workdir={tmp_path}",
  ]
  stopped = train.main([*args, "--max_steps=3"])
  assert [e["step"] for e in stopped["history"]] == [3]
  resumed = train.main([*args, "--resume"])
  assert [e["step"] for e in resumed["history"]] == [1437 // 128]
  assert resumed["config"]["resume"] and resumed["config"]["mesh"] == "data=1"
  assert "epoch 1: step 11" in capsys.readouterr().out


def test_make_mesh():
  mesh = distributed.make_mesh()
  assert mesh.axis_names == ("data",)
  assert mesh.devices.size == len(jax.devices())
  assert distributed.make_mesh("data=1").devices.size == 1
  with pytest.raises(ValueError, match="asks for"):
    distributed.make_mesh(f"data={len(jax.devices()) + 1}")
  with pytest.raises(ValueError, match="'auto' or 'data=N'"):
    distributed.make_mesh("model=1")


def test_data_parallel_mesh_matches_one_device(data_dir, tmp_path):
  # The runs on 8 devices go in a subprocess (tests/_mesh_train.py, with the
  # same settings); this process keeps its one device.
  config = _mesh_train.config(data_dir)
  one = train.train_and_evaluate(config, tmp_path / "one")
  env = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
  }
  result = subprocess.run(
    [sys.executable, "-m", "_mesh_train", data_dir, str(tmp_path)],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert "ok batch split over 8 devices" in result.stdout, result.stdout
  assert "ok batch_size check" in result.stdout, result.stdout

  def assert_close(workdir):
    step, actual = _latest_checkpoint(tmp_path / workdir, config)
    expected_step, expected = _latest_checkpoint(tmp_path / "one", config)
    assert step == expected_step == 4
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      actual,
      expected,
    )

  assert_close("eight")  # 4 steps on 8 devices.
  eight = json.loads((tmp_path / "eight" / "metrics.json").read_text())
  np.testing.assert_allclose(
    eight["history"][0]["train_loss"], one["history"][0]["train_loss"], rtol=1e-5
  )
  # 2 steps on 8 devices, resumed here on one for 2 more.
  train.train_and_evaluate(dataclasses.replace(config, resume=True), tmp_path / "moved")
  assert_close("moved")


def test_unknown_optimizer():
  with pytest.raises(ValueError, match="Unknown optimizer"):
    make_optimizer("rmsprop")


def test_compare_main_writes_table_json_and_plots(data_dir, tmp_path, capsys):
  out = tmp_path / "out"
  compare.main(
    [
      "--optimizers=lgm,layer_sam",
      "--seeds=1",
      "--epochs=1",
      "--pgd_steps=2",
      f"--data_dir={data_dir}",
      f"--out={out}",
      "--no_progress",
    ]
  )
  printed = capsys.readouterr().out
  assert "| optimizer |" in printed
  assert "| lgm |" in printed and "| layer_sam |" in printed
  results = json.loads((out / "results.json").read_text())
  assert set(results["summary"]) == {"lgm", "layer_sam"}
  for plot in compare.PLOTS:
    assert (out / plot).stat().st_size > 0, plot
