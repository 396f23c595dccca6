"""The library's optimizers train a Flax NNX CNN on the bundled digits data.

The model, the data and the step are the example trainer's
(`examples.train.train_step`), with the optimizer built here.
"""

import numpy as np
import optax
import pytest
from flax import nnx

import optax_lgm
from examples import input_pipeline, models, robustness, train


@pytest.mark.parametrize(
  "name,tx,epochs",
  [
    ("scale_by_lgm+sgd", optax.chain(optax_lgm.scale_by_lgm(), optax.sgd(0.1, 0.9)), 3),
    ("lgm", optax_lgm.lgm(learning_rate=0.1), 3),
    # DGS moves every entry by about the learning rate: small ones, one more epoch.
    ("dgs", optax_lgm.dgs(learning_rate=3e-4), 4),
    ("dgs_element", optax_lgm.dgs(learning_rate=1e-3, reduction="element"), 4),
  ],
)
def test_trains_nnx_cnn_on_digits_above_90_percent(digits, name, tx, epochs):
  train_split, test, meta = digits
  model = models.create_model(
    "cnn", meta.num_classes, meta.input_shape, meta.mean, meta.std, nnx.Rngs(0)
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  losses = []
  for epoch in range(epochs):
    for batch in input_pipeline.iterate(train_split, 64, seed=0, epoch=epoch):
      losses.append(train.train_step(model, optimizer, batch["image"], batch["label"]))
  assert np.all(np.isfinite(losses)), name
  accuracy = float(robustness.accuracy(model, test["image"], test["label"]))
  assert accuracy > 0.9, (name, accuracy)
