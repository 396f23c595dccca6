"""Does one learning rate of ``optax_lgm.dgs`` train models of different sizes?

Trains the CNN, ResNet-20 and Transformer of ``examples.models`` and a small MLP
on the bundled digits with ``optax_lgm.dgs(lr)`` for a few epochs, through the
example trainer's step and loop (``benchmarks._tasks.train_nnx``), at each
learning rate of a grid, and prints the test accuracy of each (model, learning
rate) and each model's number of parameters. ``--denominator sum`` runs the
paper's equation instead of the ready optimizer's mean; ``--momentum -1`` runs
without momentum.

Run: ``python -m benchmarks.dgs_transfer [--lrs 0.0001,0.0003 --epochs 20]``.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_lgm
from benchmarks import _tasks
from examples import loop, models

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


def main(argv=None):
  args = _tasks.parser(
    __doc__, lrs="0.0003", models=",".join(MODELS), epochs=20, batch=64, seed=0,
    momentum=(0.9, "<0: none"), json=None, denominator=["mean", "sum"],
    reduction=["global", "layer", "element"],
  ).parse_args(argv)  # fmt: skip
  train_split, test_split, meta = _tasks.digits(8)
  data = (meta.num_classes, meta.input_shape, meta.mean, meta.std)
  lrs = [float(v) for v in args.lrs.split(",")]
  rows = []
  start = time.perf_counter()
  for name in args.models.split(","):
    create = MLP if name == "mlp" else functools.partial(models.create_model, name)
    for lr in lrs:
      tx = optax_lgm.dgs(
        lr, None if args.momentum < 0 else args.momentum,
        denominator=args.denominator, reduction=args.reduction,
      )  # fmt: skip
      model = create(*data, rngs=nnx.Rngs(args.seed))
      acc = _tasks.train_nnx(
        model, tx, train_split, test_split, epochs=args.epochs, batch=args.batch,
        seed=args.seed,
      )[0]  # fmt: skip
      n = optax.tree.size(nnx.state(model, nnx.Param))
      rows.append(dict(model=name, params=n, lr=lr, accuracy=acc))
      print(f"{name:12s} {n:8d} params  lr={lr:g}  test accuracy {acc:.4f}", flush=True)
  print(
    f"\ndgs(lr, {args.momentum}, denominator={args.denominator!r}, "
    f"reduction={args.reduction!r}), digits, "
    f"{args.epochs} epochs, batch {args.batch}, seed {args.seed}, "
    f"{time.perf_counter() - start:.0f} s, {jax.devices()[0].platform}"
  )
  record = _tasks.record("benchmarks.dgs_transfer", argv)
  result = dict(**record, settings=vars(args), rows=rows)
  tables = loop.docs_script("make_tables")
  print(tables.markdown(tables.dgs_transfer_table(result)))
  _tasks.write_json(args.json, result)


if __name__ == "__main__":
  main()
