"""Tests for examples/robustness.py, on a small CNN trained briefly on digits."""

import _stacking  # tests/_stacking.py: the two layouts of the transformer.
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from examples import input_pipeline, models, robustness

PGD_STEPS = 5


def _key(seed):
  # RBG keys: XLA:CPU compiles their random bits several times faster than
  # threefry's.
  return jax.random.key(seed, impl="rbg")


def _create(model_fn, *args, **kwargs):
  """Builds a model in one compilation (eagerly, each parameter shape is one)."""
  return nnx.jit(lambda: model_fn(*args, **kwargs, rngs=nnx.Rngs(_key(0))))()


@pytest.fixture(scope="module")
def trained(digits):
  """A CNN after 88 Adam steps (four epochs of batch 64): about 90% accurate."""
  train, test, metadata = digits
  model = _create(
    models.CNN,
    metadata.num_classes,
    metadata.input_shape,
    metadata.mean,
    metadata.std,
    features=(8, 16),
    hidden=32,
  )
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, images, labels):
    def loss_fn(model):
      logits = model(images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = nnx.grad(loss_fn)(model)
    optimizer.update(model, grads)

  for epoch in range(4):
    for batch in input_pipeline.iterate(train, 64, seed=0, epoch=epoch):
      train_step(model, optimizer, batch["image"], batch["label"])
  return model, test["image"], test["label"]


@pytest.fixture(scope="module")
def results(trained):
  model, images, labels = trained
  return robustness.evaluate_robustness(
    model,
    images,
    labels,
    key=_key(0),
    eps_list=(0.0, 0.02, 0.05, 0.1, 0.2),
    sigmas=(0.0, 0.1),
    pgd_steps=PGD_STEPS,
    batch_size=len(labels),
  )


def test_result_keys(results):
  assert list(results) == [
    "clean",
    "fgsm@0",
    "pgd@0",
    "fgsm@0.02",
    "pgd@0.02",
    "fgsm@0.05",
    "pgd@0.05",
    "fgsm@0.1",
    "pgd@0.1",
    "fgsm@0.2",
    "pgd@0.2",
    "noise@0",
    "noise@0.1",
  ]
  assert all(isinstance(v, float) for v in results.values())


def test_the_model_learned(results):
  assert results["clean"] > 0.8


def test_zero_perturbation_is_clean(results):
  assert results["fgsm@0"] == results["clean"]
  assert results["pgd@0"] == results["clean"]
  assert results["noise@0"] == results["clean"]


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_accuracy_falls_as_eps_grows(results, attack):
  eps_list = ("0", "0.02", "0.05", "0.1", "0.2")
  accuracies = [results[f"{attack}@{eps}"] for eps in eps_list]
  assert all(a >= b for a, b in zip(accuracies, accuracies[1:]))
  assert accuracies[-1] < accuracies[0] - 0.5


def test_pgd_is_at_least_as_strong_as_fgsm(results):
  assert results["pgd@0.1"] <= results["fgsm@0.1"]


def test_accuracy_matches_a_direct_count(trained):
  model, images, labels = trained
  model.eval()
  predictions = np.argmax(model(images), axis=-1)
  expected = np.mean(predictions == labels)
  assert robustness.accuracy(model, images, labels, batch_size=100) == pytest.approx(
    expected
  )


def _assert_in_box(perturbed, images, eps):
  perturbed = np.asarray(perturbed)
  assert perturbed.shape == images.shape
  assert perturbed.min() >= 0.0 and perturbed.max() <= 1.0
  assert np.abs(perturbed - images).max() <= eps + 1e-6


@pytest.mark.parametrize("eps", [0.05, 0.2])
def test_attacks_stay_in_the_box(trained, eps):
  model, images, labels = trained
  fgsm_images = robustness.fgsm(model, images, labels, eps)
  _assert_in_box(fgsm_images, images, eps)
  for key in (None, _key(1)):
    pgd_images = robustness.pgd(model, images, labels, eps, steps=PGD_STEPS, key=key)
    _assert_in_box(pgd_images, images, eps)
    assert np.abs(np.asarray(pgd_images) - images).max() > eps / 2


def test_gaussian_noise(trained):
  _, images, _ = trained
  noisy = np.asarray(robustness.gaussian_noise(images, 0.1, _key(2)))
  assert noisy.min() >= 0.0 and noisy.max() <= 1.0
  inside = (images > 0.3) & (images < 0.7)  # Rarely clipped.
  np.testing.assert_allclose(np.std((noisy - images)[inside]), 0.1, rtol=0.1)
  np.testing.assert_array_equal(robustness.gaussian_noise(images, 0.0, _key(2)), images)


def test_attacks_run_the_model_in_eval_mode(digits):
  _, test, metadata = digits
  images, labels = test["image"][:8], test["label"][:8]
  model = _create(
    models.ResNet,
    metadata.num_classes,
    metadata.input_shape,
    metadata.mean,
    metadata.std,
    depth=8,
    width=4,
  )
  batch_stats = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  eval_model = nnx.clone(model)
  eval_model.eval()

  adversarial = robustness.fgsm(model, images, labels, 0.1)

  expected = robustness.fgsm(eval_model, images, labels, 0.1)
  np.testing.assert_array_equal(adversarial, expected)
  assert model.bn.use_running_average is False  # The caller's mode is kept.
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat)),
    batch_stats,
  )


def test_attacks_on_a_stacked_transformer(digits):
  # The input gradient runs through the scan of the stacked blocks: the same
  # adversarial images as the unstacked model with the same weights.
  _, test, metadata = digits
  images, labels = test["image"][:8], test["label"][:8]
  shape = (metadata.num_classes, metadata.input_shape, metadata.mean, metadata.std)
  sizes = dict(dim=8, depth=2, num_heads=2, mlp_dim=8)
  unstacked = _create(models.TransformerClassifier, *shape, **sizes)
  stacked = _create(models.TransformerClassifier, *shape, **sizes, stacked=True)
  graphdef, _ = nnx.split(stacked)
  stacked = nnx.merge(graphdef, _stacking.stack_params(nnx.state(unstacked)))
  for attack in (robustness.fgsm, robustness.pgd):
    np.testing.assert_allclose(
      attack(stacked, images, labels, 0.1),
      attack(unstacked, images, labels, 0.1),
      atol=1e-6,
    )
