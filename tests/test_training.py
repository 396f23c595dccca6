"""The library's optimizers train a Flax NNX CNN on the bundled digits data."""

import optax
import pytest

import optax_lgm
from benchmarks.lgm_defaults import data, train


@pytest.fixture(scope="module")
def digits():
  return data()


@pytest.mark.parametrize(
  "name,tx",
  [
    ("scale_by_lgm+sgd", optax.chain(optax_lgm.scale_by_lgm(), optax.sgd(0.1, 0.9))),
    ("lgm", optax_lgm.lgm(0.1)),
    ("dgs", optax_lgm.dgs(100.0)),
    ("dgs_element", optax_lgm.dgs(1e-2, reduction="element")),
  ],
)
def test_trains_nnx_cnn_on_digits_above_90_percent(digits, name, tx):
  accuracy, _, diverged = train(tx, 0, 3, 64, 0.95, *digits)
  assert not diverged
  assert accuracy > 0.9, (name, accuracy)
