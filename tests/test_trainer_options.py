"""The trainer's options: --dtype, --grad_accum and --skip_nonfinite.

Each with every optimizer of the trainer, on the digits CNN, a few steps.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from examples import input_pipeline, models, optimizers, train


def _config(data_dir, **kwargs):
  settings = dict(
    epochs=1, batch_size=128, data_dir=data_dir, robustness=False, progress=False
  )
  return train.Config(**{**settings, **kwargs})


def _saved(workdir):
  """The arrays of the latest checkpoint, with their saved dtypes."""
  manager = ocp.CheckpointManager(workdir / "checkpoints")
  restored = manager.restore(
    manager.latest_step(),
    args=ocp.args.Composite(
      model=ocp.args.StandardRestore(), optimizer=ocp.args.StandardRestore()
    ),
  )
  manager.close()
  return {"model": restored["model"], "optimizer": restored["optimizer"]}


def _initial_model(meta, seed=0, **kwargs):
  rngs = nnx.Rngs(jax.random.key(seed, impl="rbg"))
  return models.create_model(
    "cnn", meta.num_classes, meta.input_shape, meta.mean, meta.std, rngs, **kwargs
  )


@pytest.mark.parametrize("name", optimizers.OPTIMIZERS)
def test_bfloat16_and_accumulation_with_every_optimizer(
  name, data_dir, digits, tmp_path
):
  config = _config(
    data_dir, optimizer=name, dtype="bfloat16", grad_accum=2, batch_size=64, max_steps=4
  )
  results = train.train_and_evaluate(config, tmp_path)
  assert np.isfinite(results["history"][-1]["train_loss"])
  saved = _saved(tmp_path)
  floats = {
    x.dtype for x in jax.tree.leaves(saved) if jnp.issubdtype(x.dtype, jnp.floating)
  }
  assert floats == {np.dtype(np.float32)}  # Parameters and states stay float32.
  meta = digits[2]
  initial = nnx.to_pure_dict(nnx.state(_initial_model(meta), nnx.Param))
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), saved["model"], initial)
  assert all(jax.tree.leaves(changed)), name
  if name == "layer_sam":  # Static mode by default, with accumulation too.
    assert results["layer_sam_static"]["compilations"] >= 1


def _batches(train_split, batch_size, count):
  return [input_pipeline.batch_at(train_split, batch_size, 0, i) for i in range(count)]


def _params_after(data_dir, tmp_path, **kwargs):
  config = _config(data_dir, eval_every=0, **kwargs)
  train.train_and_evaluate(config, tmp_path)
  return _saved(tmp_path)["model"]


def test_accumulating_two_half_batches_is_one_whole_batch(data_dir, tmp_path):
  # SGD on the mean gradient of two batches of 64 = one step on their 128
  # examples (the data order is a permutation sliced into batches).
  half = _params_after(
    data_dir, tmp_path / "half", optimizer="sgd", batch_size=64, grad_accum=2,
    max_steps=2,
  )  # fmt: skip
  whole = _params_after(
    data_dir, tmp_path / "whole", optimizer="sgd", batch_size=128, max_steps=1
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), half, whole
  )


def test_sam_accumulation_perturbs_each_micro_batch_at_its_own_gradient(
  data_dir, digits, tmp_path
):
  lr, rho = optimizers.DEFAULT_LEARNING_RATES["sam"], optimizers.DEFAULT_RHOS["sam"]
  actual = _params_after(
    data_dir, tmp_path, optimizer="sam", batch_size=64, grad_accum=2, max_steps=2
  )
  # Reference: w1 = w0 - lr * mean_i grad L_i(w0 + rho g_i / |g_i|), g_i =
  # grad L_i(w0) (the first step of SGD with momentum is plain SGD).
  train_split, _, meta = digits
  graphdef, params = nnx.split(_initial_model(meta), nnx.Param)

  def grad(p, batch):
    def loss(q):
      return train.loss_fn(nnx.merge(graphdef, q), batch["image"], batch["label"])

    return jax.grad(loss)(p)

  sam_grads = []
  for batch in _batches(train_split, 64, 2):
    g = grad(params, batch)
    norm = optax.tree.norm(g)
    perturbed = jax.tree.map(lambda w, gi, n=norm: w + rho * gi / n, params, g)
    sam_grads.append(grad(perturbed, batch))
  mean = jax.tree.map(lambda a, b: (a + b) / 2, *sam_grads)
  expected = nnx.to_pure_dict(jax.tree.map(lambda w, s: w - lr * s, params, mean))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    actual,
    expected,
  )


def _inject_nan(monkeypatch, at):
  """Makes the batches of the steps in ``at`` all NaN."""
  batch_at = input_pipeline.batch_at

  def with_nan(split, batch_size, seed, step):
    batch = batch_at(split, batch_size, seed, step)
    if step in at:
      batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
    return batch

  monkeypatch.setattr(input_pipeline, "batch_at", with_nan)


def _drop(monkeypatch, index):
  """Leaves out the batch of step ``index`` (the run a skipped step must equal)."""
  batch_at = input_pipeline.batch_at

  def without(split, batch_size, seed, step):
    return batch_at(split, batch_size, seed, step + (step >= index))

  monkeypatch.setattr(input_pipeline, "batch_at", without)


@pytest.mark.parametrize("name", optimizers.OPTIMIZERS)
def test_a_nan_batch_is_skipped_with_every_optimizer(name, data_dir, tmp_path):
  config = _config(data_dir, optimizer=name, skip_nonfinite=3, eval_every=0)
  with pytest.MonkeyPatch.context() as patch:
    _inject_nan(patch, at={1})
    skipped = train.train_and_evaluate(
      dataclasses.replace(config, max_steps=4), tmp_path / "nan"
    )
  with pytest.MonkeyPatch.context() as patch:
    _drop(patch, 1)
    clean = train.train_and_evaluate(
      dataclasses.replace(config, max_steps=3), tmp_path / "clean"
    )
  assert skipped["skipped_steps"] == 1 and clean["skipped_steps"] == 0
  # The skipped step changed nothing: the run equals one without that batch.
  jax.tree.map(
    np.testing.assert_array_equal,
    _saved(tmp_path / "nan")["model"],
    _saved(tmp_path / "clean")["model"],
  )


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(data_dir, tmp_path):
  config = _config(data_dir, optimizer="sgd", skip_nonfinite=2, max_steps=8)
  with pytest.MonkeyPatch.context() as patch:
    _inject_nan(patch, at={2, 3, 4, 5})
    with pytest.raises(train.NonFiniteError, match="stopped at step 4: 2 steps"):
      train.train_and_evaluate(config, tmp_path)
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert metrics["skipped_steps"] == 2 and metrics["stopped"].startswith("stopped")


def test_a_nan_batch_leaves_batchnorm_statistics_alone():
  model = models.ResNet(
    10, (8, 8, 1), (0.3,), (0.4,), depth=8, width=4, rngs=nnx.Rngs(0)
  )
  optimizer = nnx.Optimizer(
    model, optimizers.make_optimizer("sgd", skip_nonfinite=3), wrt=nnx.Param
  )
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  images = np.full((4, 8, 8, 1), np.nan, np.float32)
  loss = train.train_step(model, optimizer, images, np.zeros(4, np.int32))
  assert not np.isfinite(loss)
  after = nnx.to_pure_dict(nnx.state(model))
  jax.tree.map(np.testing.assert_array_equal, after, before)
  assert int(optimizer.opt_state.total_notfinite[...]) == 1


@pytest.mark.parametrize("name", ["sam", "layer_sam"])
def test_sam_every_decided_on_the_host_equals_the_graph(name, data_dir, tmp_path):
  runs = {}
  for dispatch in ("host", "graph"):
    config = _config(
      data_dir, optimizer=name, layer_sam_mode="dynamic", sam_every=2,
      sam_dispatch=dispatch, max_steps=5,
    )  # fmt: skip
    results = train.train_and_evaluate(config, tmp_path / dispatch)
    runs[dispatch] = results, _saved(tmp_path / dispatch)
  (host, host_arrays), (graph, graph_arrays) = runs["host"], runs["graph"]
  assert host["compile"]["compilations"] == 2  # A SAM step and a plain one.
  assert graph["compile"]["compilations"] == 1  # One, with lax.cond.
  for results in (host, graph):  # Steps 0, 2 and 4 ran the second pass.
    perturbed = results["history"][-1]["layer_stats"]["sam_perturbed_steps"]
    assert set(np.ravel(list(perturbed.values()))) == {3}
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    host_arrays, graph_arrays,
  )  # fmt: skip


def test_host_dispatch_is_refused_with_static_layer_sam_and_auto_avoids_it(
  data_dir, tmp_path
):
  config = _config(data_dir, optimizer="layer_sam", sam_every=2, max_steps=3)
  with pytest.raises(train.UsageError, match="sam_dispatch=host does not combine"):
    train.train_and_evaluate(
      dataclasses.replace(config, sam_dispatch="host"), tmp_path / "host"
    )
  results = train.train_and_evaluate(config, tmp_path / "auto")  # The graph's.
  perturbed = results["history"][-1]["layer_stats"]["sam_perturbed_steps"]
  assert set(np.ravel(list(perturbed.values()))) == {2}
