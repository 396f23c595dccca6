"""Measures the options of ``scale_by_lgm`` on the bundled digits data.

The measurement behind the defaults of :func:`optax_lgm.scale_by_lgm`: the CNN
of ``examples.models`` trained on the 8x8 digits with SGD + momentum through the
example trainer's step and loop (``benchmarks._tasks.train_nnx``), each LGM
variant in front of the same SGD, several seeds. Prints a markdown table of the
final test accuracy, the step at which the test accuracy first reaches a target
and whether the run diverged.

Run: ``python -m benchmarks.lgm_defaults [--epochs 15 --seeds 3]``.
"""

import time

import jax
import numpy as np
import optax
from flax import nnx

import optax_lgm
from benchmarks import _tasks
from examples import loop, models

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


def main(argv=None):
  args = _tasks.parser(
    __doc__, epochs=15, seeds=3, batch=64, lr=0.05, target=0.95, json=None
  ).parse_args(argv)
  train_split, test_split, meta = _tasks.digits(8)
  data = (meta.num_classes, meta.input_shape, meta.mean, meta.std)
  rows = {}
  start = time.perf_counter()
  for name, kwargs in VARIANTS.items():
    # Only the variant without normalisation ("literal") steps at lr * 1e-4.
    literal = kwargs is not None and kwargs.get("normalize", "geometric") is None
    lr = args.lr * (1e-4 if literal else 1.0)
    sgd = optax.sgd(lr, momentum=0.9)
    tx = sgd if kwargs is None else optax.chain(optax_lgm.scale_by_lgm(**kwargs), sgd)
    runs = []
    for seed in range(args.seeds):
      model = models.create_model("cnn", *data, nnx.Rngs(seed))
      runs.append(_tasks.train_nnx(
        model, tx, train_split, test_split, epochs=args.epochs, batch=args.batch,
        seed=seed, eval_every=5, target=args.target,
      ))  # fmt: skip
    accs = np.array([r[0] for r in runs])
    reached = [r[1] for r in runs if r[1] is not None]
    rows[name] = dict(
      lr=lr, acc_mean=float(accs.mean()), acc_std=float(accs.std()),
      steps_to_target=float(np.mean(reached)) if reached else None,
      reached=len(reached), diverged=sum(r[2] for r in runs),
    )  # fmt: skip
  print(
    f"digits CNN, SGD momentum 0.9, {args.epochs} epochs, batch {args.batch}, "
    f"{args.seeds} seeds, {time.perf_counter() - start:.0f} s, {jax.devices()[0]}"
  )
  result = dict(
    **_tasks.record("benchmarks.lgm_defaults", argv), target=args.target,
    seeds=args.seeds, settings=vars(args), rows=rows,
  )  # fmt: skip
  tables = loop.docs_script("make_tables")
  print(tables.markdown(tables.lgm_defaults_table(result)))
  _tasks.write_json(args.json, result)


if __name__ == "__main__":
  main()
