"""Does one learning rate of ``optax_lgm.dgs`` train models of different sizes?

Trains the models of ``examples/`` (the CNN, ResNet-20 and Transformer of
``examples.models``) and a small MLP on the bundled digits data with
``optax_lgm.dgs(lr)`` for a few epochs, at each learning rate of a grid, and
prints the test accuracy of each (model, learning rate) and the number of
parameters of each model. ``--denominator sum`` runs the paper's equation
instead of the ready optimizer's mean; ``--momentum -1`` runs without
momentum.

Run: ``python -m benchmarks.dgs_transfer [--lrs 0.0001,0.0003 --epochs 20]``.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import optax_lgm
from benchmarks import _tasks
from examples import models

MODELS = ("mlp", "cnn", "resnet20", "transformer")


class MLP(nnx.Module):
  """One hidden layer of 128 units: about 9.6k parameters on 8x8 digits."""

  def __init__(self, num_classes, input_shape, mean, std, *, rngs: nnx.Rngs):
    self.mean, self.std = jnp.asarray(mean), jnp.asarray(std)
    self.hidden = nnx.Linear(int(np.prod(input_shape)), 128, rngs=rngs)
    self.out = nnx.Linear(128, num_classes, rngs=rngs)

  def __call__(self, images):
    x = ((images - self.mean) / self.std).reshape(images.shape[0], -1)
    return self.out(nnx.relu(self.hidden(x)))


def make_model(name, meta, seed):
  args = (meta.num_classes, meta.input_shape, meta.mean, meta.std)
  if name == "mlp":
    return MLP(*args, rngs=nnx.Rngs(seed))
  return models.create_model(name, *args, rngs=nnx.Rngs(seed))


def num_params(model) -> int:
  return sum(int(np.size(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def train(name, tx, train_split, test_split, meta, *, epochs, batch, seed):
  """Final test accuracy after ``epochs`` epochs (0 if the loss diverged).

  The step and loop are the example trainer's (``benchmarks._tasks.train_nnx``).
  """
  model = make_model(name, meta, seed)
  steps = epochs * (len(train_split["label"]) // batch)
  metrics, losses = _tasks.train_nnx(
    model, tx, train_split, test_split, steps=steps, batch=batch, seed=seed,
    eval_every=steps,
  )  # fmt: skip
  if not np.isfinite(float(losses[-1])):
    return 0.0, num_params(model)
  return metrics.data["curve"][-1]["test_accuracy"], num_params(model)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lrs", default="0.0003")
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--epochs", type=int, default=20)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--denominator", default="mean", choices=("mean", "sum"))
  parser.add_argument(
    "--reduction", default="global", choices=("global", "layer", "element")
  )
  parser.add_argument("--momentum", type=float, default=0.9, help="<0: none")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  train_split, test_split, meta = _tasks.digits(8)
  lrs = [float(v) for v in args.lrs.split(",")]
  rows = []
  start = time.perf_counter()
  for name in args.models.split(","):
    for lr in lrs:
      tx = optax_lgm.dgs(
        lr,
        None if args.momentum < 0 else args.momentum,
        denominator=args.denominator,
        reduction=args.reduction,
      )
      acc, n = train(
        name, tx, train_split, test_split, meta,
        epochs=args.epochs, batch=args.batch, seed=args.seed,
      )  # fmt: skip
      rows.append(dict(model=name, params=n, lr=lr, accuracy=acc))
      print(f"{name:12s} {n:8d} params  lr={lr:g}  test accuracy {acc:.4f}", flush=True)
  print(
    f"\ndgs(lr, {args.momentum}, denominator={args.denominator!r}, "
    f"reduction={args.reduction!r}), digits, "
    f"{args.epochs} epochs, batch {args.batch}, seed {args.seed}, "
    f"{time.perf_counter() - start:.0f} s, {jax.devices()[0].platform}"
  )
  print("| model | parameters | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |")
  print("|---|---|" + "---|" * len(lrs))
  for name in args.models.split(","):
    mine = [r for r in rows if r["model"] == name]
    accs = " | ".join(f"{r['accuracy']:.1%}" for r in mine)
    print(f"| {name} | {mine[0]['params']:,} | {accs} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
