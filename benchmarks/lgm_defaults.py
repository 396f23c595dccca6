"""Measures the options of ``scale_by_lgm`` on the bundled digits data.

This is the measurement behind the defaults of :func:`optax_lgm.scale_by_lgm`:
a small CNN (Flax NNX) trained with SGD + momentum on scikit-learn's 8x8
digits, each LGM variant in front of the same SGD, several seeds. It prints
a markdown table of final test accuracy, the step at which test accuracy
first reaches a target, and whether the run diverged.

Run: ``python -m benchmarks.lgm_defaults [--epochs 15 --seeds 3]``.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import optax_lgm

NO_CLIP = dict(min_scale=None, max_scale=None)
VARIANTS = {
  "sgd (no LGM)": None,
  "literal p=1, no norm": dict(power=1.0, normalize=None, eps=1e-8, **NO_CLIP),
  "spatial p=1, geometric": dict(power=1.0, normalize="geometric", **NO_CLIP),
  "spatial p=0.5, geometric": dict(power=0.5, normalize="geometric", **NO_CLIP),
  "spatial p=0.5, geometric, clip [0.1, 10] (default)": dict(
    power=0.5, normalize="geometric", min_scale=0.1, max_scale=10.0
  ),
  "spatial p=0.5, mean": dict(power=0.5, normalize="mean", **NO_CLIP),
  "spatial p=0.5, geometric, clip, module": dict(layers="module"),
  "temporal p=0.5, geometric, clip": dict(variance="temporal"),
}


class CNN(nnx.Module):
  """Two 3x3 convolutions and a dense head, for 8x8x1 digits."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
    self.dense1 = nnx.Linear(32 * 4 * 4, 64, rngs=rngs)
    self.dense2 = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    x = nnx.avg_pool(nnx.relu(self.conv2(x)), (2, 2), (2, 2))
    x = nnx.relu(self.dense1(x.reshape(x.shape[0], -1)))
    return self.dense2(x)


def data(seed: int = 0):
  digits = load_digits()
  x = (digits.images[..., None] / 16.0).astype(np.float32)
  x = (x - x.mean()) / x.std()
  y = digits.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(x))
  train, test = perm[:1437], perm[1437:]
  return x[train], y[train], x[test], y[test]


def train(tx, seed, epochs, batch, target, x_tr, y_tr, x_te, y_te):
  model = CNN(nnx.Rngs(seed))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x, y):
    def loss(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    value, grads = nnx.value_and_grad(loss)(model)
    opt.update(model, grads)
    return value

  @nnx.jit
  def accuracy(model, x, y):
    return jnp.mean(jnp.argmax(model(x), -1) == y)

  rng = np.random.default_rng(seed)
  steps, reached = 0, None
  for _ in range(epochs):
    perm = rng.permutation(len(x_tr))
    for i in range(len(x_tr) // batch):
      idx = perm[i * batch : (i + 1) * batch]
      loss = step(model, opt, x_tr[idx], y_tr[idx])
      steps += 1
      if reached is None and steps % 5 == 0:
        if float(accuracy(model, x_te, y_te)) >= target:
          reached = steps
    if not np.isfinite(float(loss)):
      return 0.0, None, True
  return float(accuracy(model, x_te, y_te)), reached, False


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=15)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--target", type=float, default=0.95)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  arrays = data()
  rows = {}
  start = time.perf_counter()
  for name, kwargs in VARIANTS.items():
    lr = args.lr * (1e-4 if kwargs and kwargs.get("normalize") is None else 1.0)
    sgd = optax.sgd(lr, momentum=0.9)
    tx = sgd if kwargs is None else optax.chain(optax_lgm.scale_by_lgm(**kwargs), sgd)
    runs = [
      train(tx, s, args.epochs, args.batch, args.target, *arrays)
      for s in range(args.seeds)
    ]
    accs = np.array([r[0] for r in runs])
    reached = [r[1] for r in runs if r[1] is not None]
    rows[name] = dict(
      lr=lr,
      acc_mean=float(accs.mean()),
      acc_std=float(accs.std()),
      steps_to_target=float(np.mean(reached)) if reached else None,
      reached=len(reached),
      diverged=sum(r[2] for r in runs),
    )
  print(
    f"digits CNN, SGD momentum 0.9, {args.epochs} epochs, batch {args.batch}, "
    f"{args.seeds} seeds, {time.perf_counter() - start:.0f} s, {jax.devices()[0]}"
  )
  print(f"| variant | lr | test acc | steps to {args.target:.0%} (runs) | diverged |")
  print("|---|---|---|---|---|")
  for name, r in rows.items():
    steps = "-" if r["steps_to_target"] is None else f"{r['steps_to_target']:.0f}"
    print(
      f"| {name} | {r['lr']:g} | {r['acc_mean']:.4f} ± {r['acc_std']:.4f} | "
      f"{steps} ({r['reached']}/{args.seeds}) | {r['diverged']} |"
    )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
