"""End-to-end smoke tests of examples/train.py and examples/compare.py."""

import json
import math

import pytest

from examples import compare, train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.mark.parametrize("name", train.OPTIMIZERS)
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


def test_unknown_optimizer():
  with pytest.raises(ValueError, match="Unknown optimizer"):
    train.make_optimizer("rmsprop")


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
