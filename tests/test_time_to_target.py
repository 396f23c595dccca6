"""The time to target (one definition, `examples.loop`), its clock, the budget."""

import json
import shlex
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lgm
from benchmarks import _tasks, time_to_target
from examples import loop


def _run(seconds, step, final):
  return {
    "seconds_to_target": seconds,
    "steps_to_target": step,
    "final_accuracy": final,
    "train_seconds": 40.0,
    "steps": 400,
    "compilations": 2,
    "curve": [{"step": 20, "seconds": 20.0, "accuracy": 0.5}] * 2,
  }


def test_summary_takes_the_median_and_reports_misses():
  args = types.SimpleNamespace(eval_every=20, target=0.97)
  runs = {
    "sam": [_run(30.0, 200, 0.98), _run(10.0, 100, 0.99), _run(20.0, 160, 0.97)],
    "sgd": [_run(5.0, 60, 0.96), _run(None, None, 0.95), _run(7.0, 80, 0.97)],
  }
  rows = time_to_target.summarize(runs)
  assert rows["sam"]["median_seconds"] == 20.0
  assert rows["sam"]["median_steps"] == 160
  # A seed that missed the target counts as infinite (AlgoPerf's rule).
  assert rows["sgd"]["median_seconds"] == 7.0
  assert rows["sgd"]["seconds"] == [5.0, None, 7.0]
  runs["sgd"][0] = _run(None, None, 0.9)  # Two misses: an infinite median.
  rows = time_to_target.summarize(runs)
  assert rows["sgd"]["median_seconds"] is None
  # The table that the benchmark prints and the results page includes.
  tables = loop.docs_script("make_tables")
  _, (sam_row, sgd_row) = tables.time_to_target_table(
    {"target": args.target, "contenders": rows}
  )
  assert sam_row[:6] == ["sam", "20.0", "1.00", "3/3", "30, 10, 20", "160"]
  assert sgd_row[:5] == ["sgd", "—", "—", "1/3", "—, —, 7"]


def test_median_time_counts_a_miss_as_infinite():
  assert loop.median_time([5.0, None, 7.0]) == 7.0
  assert loop.median_time([None, None, 1.0]) == float("inf")
  curve = [{"step": s, "test_accuracy": a, "seconds": s / 10} for s, a in
           [(10, 0.5), (20, 0.96), (30, 0.9)]]  # fmt: skip
  assert loop.time_to_target(curve, 0.95) == (2.0, 20)
  assert loop.time_to_target(curve, 0.99) == (None, None)


def _fake_clock(monkeypatch):
  now = [0.0]
  monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])

  def step(state, batch):
    now[0] += 1.0  # A step: one second.
    return state + 1, batch

  def evaluate(state):
    now[0] += 100.0  # An evaluation: off the clock.
    return state / 10

  return step, evaluate


def test_the_clock_counts_the_steps_and_stops_for_evaluations(monkeypatch):
  step, evaluate = _fake_clock(monkeypatch)
  metrics = loop.Metrics(0.35)
  state = loop.run(
    step, 0, lambda i: i, range(10), metrics, evaluate=evaluate,
    eval_at=lambda i: i % 2 == 0,
  )  # fmt: skip
  assert state == 10 and metrics.data["train_seconds"] == 10.0
  assert [p["seconds"] for p in metrics.data["curve"]] == [2.0, 4.0, 6.0, 8.0, 10.0]
  assert (metrics.data["time_to_target"], metrics.data["steps_to_target"]) == (4.0, 4)

  # Stopped after 5 steps and resumed: the same record.
  resumed = loop.Metrics(0.35)
  for steps in (range(0, 5), range(5, 10)):
    state = loop.run(
      step, steps.start, lambda i: i, steps, resumed, evaluate=evaluate,
      eval_at=lambda i: i % 2 == 0,
    )  # fmt: skip
  assert resumed.data == metrics.data


def test_stop_at_target(monkeypatch):
  step, evaluate = _fake_clock(monkeypatch)
  metrics = loop.Metrics(0.35)
  state = loop.run(
    step, 0, lambda i: i, range(10), metrics, evaluate=evaluate,
    eval_at=lambda i: i % 2 == 0, stop_at_target=True,
  )  # fmt: skip
  assert state == 4 and metrics.data["steps_to_target"] == 4


def test_a_pure_task_trains_through_the_loop(data_dir, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
  train, test, _ = _tasks.digits(8)
  task = _tasks.Task(train["image"], model="cnn")
  tx = optax.sgd(0.1, momentum=0.9)
  step = jax.jit(_tasks.make_step(task, tx, sam=False))
  (params, _, _), metrics = _tasks.train_pure(
    task, tx, step, train, test, steps=20, batch=64, seed=0, eval_every=10
  )
  assert [p["step"] for p in metrics.data["curve"]] == [10, 20]
  assert metrics.data["curve"][-1]["test_accuracy"] > 0.5
  assert np.isfinite(metrics.data["final_loss"])


def test_budget_mask_keeps_only_the_named_layers_as_candidates():
  params = {
    "blocks": {
      7: {"conv1": {"kernel": jnp.ones((3, 3))}},
      8: {"conv1": {"kernel": jnp.ones((3, 3))}},
    },
    "head": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
    "conv": {"kernel": jnp.ones((3, 3))},
  }
  mask = _tasks.budget_mask("blocks/8,head")(params)
  assert mask["blocks"][8]["conv1"]["kernel"] and mask["head"]["kernel"]
  assert not mask["blocks"][7]["conv1"]["kernel"] and not mask["conv"]["kernel"]
  names = optax_lgm.layer_names(
    params, "module", mask=_tasks.budget_mask("blocks/8,head")
  )
  assert set(names) == {"blocks/8/conv1", "head"}

  # layer_sam with the budget: the layers outside it are never perturbed, even
  # when their gradients are the largest.
  tx = optax_lgm.layer_sam(
    optax.sgd(0.1), k=1, mask=_tasks.budget_mask(("blocks/8", "head"))
  )

  def loss(p, _=None):
    return 100 * jnp.sum(p["conv"]["kernel"] ** 2) + jnp.sum(p["head"]["kernel"] ** 2)

  grads = jax.grad(loss)(params)
  _, state = tx.update(grads, tx.init(params), params, grad_fn=jax.grad(loss))
  selected = dict(zip(names, np.asarray(state.selected)))
  assert selected == {"blocks/8/conv1": 0, "head": 1}


def test_unknown_contender_is_a_usage_error(capsys):
  with pytest.raises(SystemExit) as exit_info:
    time_to_target.main(["--contenders", "sgd,adamw"])
  assert exit_info.value.code == 2
  assert "adamw" in capsys.readouterr().err


@pytest.mark.parametrize(
  "dataset, flags, final",
  [
    ("digits", ["--epochs", "5"], "test"),
    (
      "fashion_mnist",
      ["--dataset", "fashion_mnist", "--max_steps", "300", "--validation", "1000"],
      "validation",
    ),
  ],
)
def test_trainer_benchmark_runs_the_contenders_command(
  dataset, flags, final, tmp_path, monkeypatch
):
  from benchmarks import trainer_time_to_target as bench

  commands = []

  def fake_run(command, **_):
    commands.append(command)
    metrics = {"evaluated_on": final, f"final_{final}_accuracy": 0.9}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))

  monkeypatch.setattr(bench.subprocess, "run", fake_run)
  result = bench.run(
    "layer_sam_dynamic_every5", dataset, "cnn", 1, "short", str(tmp_path)
  )
  (command,) = commands
  assert result["final_test_accuracy"] == 0.9  # Whichever split it was on.
  joined = " ".join(command)
  for flag in ["--optimizer layer_sam", "--layer_sam_mode dynamic", "--sam_every 5"]:
    assert flag in joined, joined
  assert all(flag in command for flag in flags), command
  learning_rate, target, _ = bench.LENGTHS[dataset]["cnn"]["short"]
  assert f"--learning_rate {learning_rate:g} --target_accuracy {target:g}" in joined


def test_trainer_benchmark_records_its_own_command(tmp_path, monkeypatch):
  from benchmarks import trainer_time_to_target as bench

  def fake_run(contender, *_, **__):
    return {
      "time_to_target": 1.0, "steps_to_target": 20, "final_test_accuracy": 0.9,
      "evaluated_on": "test", "train_seconds": 2.0, "learning_rate": 0.05,
      "rho": None, "compile": {"critical_seconds": 0.5, "background_seconds": 0.0,
                               "compilations": 1},
    }  # fmt: skip

  monkeypatch.setattr(bench, "run", fake_run)
  argv = ["--models", "cnn", "--lengths", "short", "--optimizers", "sgd,sam"]
  argv += ["--seeds", "1", "--machine", "test box", "--out", str(tmp_path / "r.json")]
  result = bench.main(argv)
  assert result["command"] == shlex.join(
    ["python", "-m", "benchmarks.trainer_time_to_target", *argv]
  )
  assert result["machine"] == "test box"
  assert "commit" in result
  assert json.loads((tmp_path / "r.json").read_text())["command"] == result["command"]
