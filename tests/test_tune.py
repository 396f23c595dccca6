"""The tuning protocol of ``compare --tune`` and the validation split it judges on."""

import dataclasses
import json
import math

import numpy as np
import pytest

from examples import compare, input_pipeline, robustness, train, tune
from examples.config import Config, UsageError, check
from examples.optimizers import DEFAULT_LEARNING_RATES, DEFAULT_RHOS


def _split(n: int) -> dict[str, np.ndarray]:
  return {
    "image": np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1),
    "label": np.arange(n, dtype=np.int32),
  }


def test_hold_out_is_a_fixed_disjoint_draw_in_order():
  rest, held = input_pipeline.hold_out(_split(100), 20)
  assert len(held["label"]) == 20 and len(rest["label"]) == 80
  assert not set(held["label"]) & set(rest["label"])
  assert set(held["label"]) | set(rest["label"]) == set(range(100))
  assert np.all(np.diff(rest["label"]) > 0) and np.all(np.diff(held["label"]) > 0)
  assert not np.array_equal(held["label"], np.arange(20))  # Drawn, not the first.
  np.testing.assert_array_equal(held["image"][:, 0, 0, 0], held["label"])
  again = input_pipeline.hold_out(_split(100), 20)[1]
  np.testing.assert_array_equal(again["label"], held["label"])


@pytest.mark.parametrize("n", [0, 100, -1])
def test_hold_out_rejects_sizes_that_leave_nothing(n):
  with pytest.raises(ValueError, match=f"num_examples={n}"):
    input_pipeline.hold_out(_split(100), n)


def test_evaluate_on_validation_needs_a_validation_split():
  with pytest.raises(UsageError, match="--validation"):
    check(Config(evaluate_on="validation"))
  with pytest.raises(UsageError, match="rho=0"):
    check(Config(rho=0.0))


def test_powers_put_the_default_inside():
  assert tune.powers(4) == [-2, -1, 0, 1]
  assert tune.powers(5) == [-2, -1, 0, 1, 2]
  assert tune.powers(2) == [-1, 0]
  with pytest.raises(ValueError, match="points=1"):
    tune.powers(1)


class FakeTraining:
  """Validation accuracy peaking at ``best_lr`` (and at ``best_rho``)."""

  def __init__(self, best_lr: float, best_rho: float = DEFAULT_RHOS["sam"]):
    self.best_lr, self.best_rho, self.runs = best_lr, best_rho, []

  def __call__(self, config: Config) -> dict:
    self.runs.append(config)
    distance = abs(math.log(config.learning_rate / self.best_lr))
    if config.rho is not None:  # None: an optimizer without a radius.
      distance += abs(math.log(config.rho / self.best_rho))
    return {"final_validation_accuracy": 1.0 / (1.0 + distance)}


def test_tune_judges_every_run_on_the_validation_split_at_seed_0():
  fake = FakeTraining(best_lr=DEFAULT_LEARNING_RATES["sgd"])
  result = tune.tune(Config(validation=100, seed=7), "sgd", fake)
  assert [r.learning_rate for r in fake.runs] == pytest.approx(
    [0.05 / 9, 0.05 / 3, 0.05, 0.15]
  )
  for run in fake.runs:
    assert (run.evaluate_on, run.seed, run.robustness) == ("validation", 0, False)
    assert (run.optimizer, run.validation) == ("sgd", 100)
  assert result["chosen"]["learning_rate"] == pytest.approx(0.05)
  assert result["inside"] and result["widened"] == [] and result["rho_grid"] == []


def test_tune_widens_at_an_edge_until_the_best_is_inside():
  default = DEFAULT_LEARNING_RATES["adam"]
  fake = FakeTraining(best_lr=default * 9)  # Beyond the first grid's top.
  result = tune.tune(Config(validation=100), "adam", fake)
  rates = [r["learning_rate"] for r in result["grid"]]
  assert rates == pytest.approx(default * 3.0 ** np.arange(-2, 4))
  assert result["widened"] == pytest.approx([default * 9, default * 27])
  assert result["chosen"]["learning_rate"] == pytest.approx(default * 9)
  assert result["inside"] and len(fake.runs) == 6

  fake = FakeTraining(best_lr=default / 1000)  # Far below: gives up, says so.
  result = tune.tune(Config(validation=100), "adam", fake, max_widen=2)
  assert result["widened"] == pytest.approx([default / 27, default / 81])
  assert result["chosen"]["learning_rate"] == pytest.approx(default / 81)
  assert not result["inside"]  # Still at the edge: recorded, not hidden.

  fake = FakeTraining(best_lr=default)  # Inside at once: no widening.
  result = tune.tune(Config(validation=100), "adam", fake)
  assert result["inside"] and result["widened"] == [] and len(fake.runs) == 4


def test_tune_chooses_rho_for_sam_at_the_chosen_rate():
  lr = DEFAULT_LEARNING_RATES["layer_sam"]
  fake = FakeTraining(best_lr=lr / 3, best_rho=0.02)
  result = tune.tune(Config(validation=100), "layer_sam", fake)
  # Around layer_sam's default radius, 0.01 (SAM's: 0.02, 0.05, 0.1).
  assert [r["rho"] for r in result["rho_grid"]] == [0.004, 0.01, 0.02]
  assert {r.rho for r in fake.runs[:4]} == {DEFAULT_RHOS["layer_sam"]}
  assert [r["learning_rate"] for r in result["rho_grid"]] == pytest.approx([lr / 3] * 3)
  assert result["chosen"] == pytest.approx({"learning_rate": lr / 3, "rho": 0.02})
  assert len(fake.runs) == 4 + 2  # The grid's run at rho=0.01 is not repeated.
  assert tune.seconds_of({"layer_sam": result}) == pytest.approx(
    sum(r["seconds"] for r in [*result["grid"], *result["rho_grid"][::2]])
  )


def test_train_evaluates_on_the_held_out_examples(data_dir, tmp_path, monkeypatch):
  sizes = []
  accuracy = robustness.accuracy

  def recording(model, images, labels):
    sizes.append(len(labels))
    return accuracy(model, images, labels)

  monkeypatch.setattr(robustness, "accuracy", recording)
  config = Config(
    data_dir=data_dir, max_steps=3, validation=200, evaluate_on="validation",
    robustness=False, checkpoints=False, progress=False,
  )  # fmt: skip
  results = train.train_and_evaluate(config, tmp_path / "validation")
  assert sizes == [200] and results["evaluated_on"] == "validation"
  assert "final_test_accuracy" not in results
  test_size = len(input_pipeline.load("digits", data_dir)[1]["label"])
  sizes.clear()
  config = dataclasses.replace(config, evaluate_on="test")
  results = train.train_and_evaluate(config, tmp_path / "test")
  assert sizes == [test_size] and "final_test_accuracy" in results


def test_compare_tune_smoke(data_dir, tmp_path, capsys):
  out = tmp_path / "out"
  compare.main([
    "--tune", "--tune_points=2", "--optimizers=sgd,sam", "--seeds=2",
    "--max_steps=6", "--batch_size=32", "--validation=150", "--no_robustness",
    f"--data_dir={data_dir}", f"--out={out}", "--no_progress",
  ])  # fmt: skip
  printed = capsys.readouterr().out
  assert "| sgd |" in printed and "chosen lr" in printed
  results = json.loads((out / "results.json").read_text())
  for name in ("sgd", "sam"):
    tuning = results["tuning"][name]
    assert len(tuning["grid"]) in (2, 3)  # 3 when widened at an edge.
    assert len(tuning["rho_grid"]) == (3 if name == "sam" else 0)
    chosen = tuning["chosen"]
    runs = tuning["grid"] + tuning["rho_grid"]
    tried = {(r["learning_rate"], r["rho"]) for r in runs}
    assert (chosen["learning_rate"], chosen["rho"]) in tried
    for run in results["runs"][name]:  # The seeds: at the choice, on the test set.
      assert run["config"]["learning_rate"] == chosen["learning_rate"]
      assert run["config"]["rho"] == chosen["rho"]
      assert run["config"]["validation"] == 150 and run["evaluated_on"] == "test"
    assert [r["config"]["seed"] for r in results["runs"][name]] == [0, 1]
  assert results["tuning_seconds"] > 0
