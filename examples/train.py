"""Trains an image classifier with one optimizer and evaluates its robustness.

Public API::

  Config                          the settings of one run (a dataclass)
  OPTIMIZERS                      names accepted by `make_optimizer`
  DEFAULT_LEARNING_RATES          the learning rate each name uses by default
  make_optimizer(name, learning_rate=None) -> optax.GradientTransformation
  train_and_evaluate(config, workdir) -> dict

`train_and_evaluate` trains a model of `examples.models` on a dataset of
`examples.input_pipeline` with ``nnx.Optimizer(model, tx, wrt=nnx.Param)``
and a jitted step (``sam`` and ``layer_sam`` get the ``grad_fn`` of their
second pass), records per-epoch metrics (train loss, test accuracy, images/s,
steps so far, `optax_lgm.layer_stats` of the optimizer state) in
``workdir/metrics.json``, and evaluates the final model with
`examples.robustness.evaluate_robustness`.

Checkpointing and resuming (orbax) are not implemented: every run starts from
scratch.

Command line::

  python examples/train.py --optimizer lgm --epochs 5 [--workdir DIR]
"""

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np
import optax
import tqdm
from flax import nnx

# Running as a script (`python examples/train.py`): make `examples` importable.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import optax_lgm  # noqa: E402
from examples import input_pipeline, models, robustness  # noqa: E402

OPTIMIZERS = ("sgd", "adam", "lars", "sam", "lgm", "dgs", "layer_sam")
"""Names accepted by `make_optimizer`."""

DEFAULT_LEARNING_RATES = {
  "sgd": 0.05,
  "adam": 1e-3,
  "lars": 2.0,
  "sam": 0.05,
  "lgm": 0.05,
  "dgs": 100.0,
  "layer_sam": 0.05,
}
"""Learning rates checked to train the digits CNN above 90% in a few epochs."""

SAM_RHO = 0.05
"""Perturbation radius of ``sam`` and ``layer_sam``."""

NEEDS_GRAD_FN = ("sam", "layer_sam")
"""Optimizers whose ``update`` takes the ``grad_fn`` of a second pass."""


@dataclasses.dataclass
class Config:
  """Settings of one training run.

  Attributes:
    dataset: a name of `examples.input_pipeline.DATASETS`.
    model: a name of `examples.models.MODELS`.
    optimizer: a name of `OPTIMIZERS`.
    learning_rate: ``None`` for the optimizer's `DEFAULT_LEARNING_RATES`.
    epochs: number of passes over the training set.
    batch_size: examples per step.
    seed: seed of the initialisation, the shuffling and the robustness keys.
    data_dir: the TFDS data dir (``None``: TFDS's default).
    eval_every: also evaluate test accuracy every this many steps (0: only at
      the end of each epoch); gives finer learning curves and steps to target.
    robustness: whether to run `examples.robustness.evaluate_robustness` on
      the final model.
    eps_list: L-infinity sizes of FGSM and PGD, on the pixel scale.
    sigmas: standard deviations of the Gaussian noise, on the pixel scale.
    pgd_steps: number of PGD steps.
    progress: whether to show a tqdm progress bar.
  """

  dataset: str = "digits"
  model: str = "cnn"
  optimizer: str = "sgd"
  learning_rate: float | None = None
  epochs: int = 5
  batch_size: int = 64
  seed: int = 0
  data_dir: str | None = None
  eval_every: int = 0
  robustness: bool = True
  eps_list: tuple[float, ...] = (8 / 255, 0.1)
  sigmas: tuple[float, ...] = (0.04, 0.06, 0.08, 0.09, 0.10)
  pgd_steps: int = 5
  progress: bool = True


def make_optimizer(
  name: str, learning_rate: float | None = None
) -> optax.GradientTransformation:
  """Builds an optimizer by name.

  Args:
    name: one of `OPTIMIZERS`.
    learning_rate: ``None`` for ``DEFAULT_LEARNING_RATES[name]``.

  Returns:
    The optax transformation. ``sam`` and ``layer_sam`` need ``grad_fn=`` in
    ``update``.

  Raises:
    ValueError: if ``name`` is not one of `OPTIMIZERS`.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer name={name!r}; expected one of {OPTIMIZERS}.")
  lr = DEFAULT_LEARNING_RATES[name] if learning_rate is None else learning_rate
  if name == "sgd":
    return optax.sgd(lr, momentum=0.9)
  if name == "adam":
    return optax.adam(lr)
  if name == "lars":
    return optax.lars(lr)
  if name == "sam":
    return optax.contrib.sam(
      optax.sgd(lr, momentum=0.9),
      optax.chain(optax.contrib.normalize(), optax.sgd(SAM_RHO)),
      opaque_mode=True,
    )
  if name == "lgm":
    return optax_lgm.lgm(lr)
  if name == "dgs":
    return optax_lgm.dgs(lr)
  return optax_lgm.layer_sam(optax.sgd(lr, momentum=0.9), rho=SAM_RHO, k=2)


def _loss(model: nnx.Module, images: jax.Array, labels: jax.Array) -> jax.Array:
  logits = model(images)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.cache
def _make_train_step(needs_grad_fn: bool):
  """Returns the jitted ``(model, optimizer, images, labels) -> loss``.

  Cached, so that runs of the same model and optimizer (several seeds) reuse
  the compiled step.
  """

  @nnx.jit
  def train_step(model, optimizer, images, labels):
    kwargs = {}
    if needs_grad_fn:
      graphdef, _, rest = nnx.split(model, nnx.Param, ...)
      rest = nnx.as_pure(rest)

      def grad_fn(params, _):  # Second pass: BatchNorm statistics untouched.
        return jax.grad(lambda p: _loss(nnx.merge(graphdef, p, rest), images, labels))(
          params
        )

      kwargs["grad_fn"] = grad_fn
    loss, grads = nnx.value_and_grad(_loss)(model, images, labels)
    optimizer.update(model, grads, **kwargs)
    return loss

  return train_step


def _to_json(value: Any) -> Any:
  """Turns NumPy scalars and arrays (as in `layer_stats`) into JSON values."""
  if isinstance(value, dict):
    return {str(k): _to_json(v) for k, v in value.items()}
  array = np.asarray(value)
  if array.ndim == 0:
    return array.item()
  return array.tolist()


def train_and_evaluate(config: Config, workdir: str | os.PathLike[str]) -> dict:
  """Trains a model as ``config`` says and evaluates it.

  Args:
    config: the settings of the run.
    workdir: a directory (created if missing); ``metrics.json`` is written
      there after every epoch and at the end.

  Returns:
    ``{'config': dict, 'history': [per-epoch dict], 'curve': [{'step',
    'test_accuracy'}], 'final_test_accuracy': float, 'robustness': dict}``.
    Each history entry has ``epoch``, ``step`` (steps so far),
    ``train_loss`` (mean over the epoch), ``test_accuracy``, ``images_per_s``
    (training throughput of the epoch, compilation included in the first) and
    ``layer_stats`` (`optax_lgm.layer_stats` of the optimizer state).
    ``robustness`` is the dict of `examples.robustness.evaluate_robustness`
    (empty if ``config.robustness`` is false).
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  train_source, test_source, meta = input_pipeline.get_datasets(
    config.dataset, config.data_dir
  )
  train = input_pipeline.load_split(train_source)
  test = input_pipeline.load_split(test_source)
  test_images, test_labels = jax.numpy.asarray(test["image"]), test["label"]

  rngs = nnx.Rngs(jax.random.key(config.seed, impl="rbg"))
  model = models.create_model(
    config.model, meta.num_classes, meta.input_shape, meta.mean, meta.std, rngs
  )
  tx = make_optimizer(config.optimizer, config.learning_rate)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  train_step = _make_train_step(config.optimizer in NEEDS_GRAD_FN)

  def test_accuracy() -> float:
    acc = robustness.accuracy(model, test_images, test_labels)
    model.train()  # Defensive: training mode for the next steps.
    return float(acc)

  results: dict[str, Any] = {
    "config": dataclasses.asdict(config),
    "history": [],
    "curve": [],
  }

  def write() -> None:
    with open(workdir / "metrics.json", "w") as f:
      json.dump(results, f, indent=2)

  steps_per_epoch = len(train["label"]) // config.batch_size
  step = 0
  bar = tqdm.tqdm(
    total=config.epochs * steps_per_epoch,
    desc=f"{config.optimizer} seed {config.seed}",
    disable=not config.progress,
    leave=False,
  )
  model.train()
  for epoch in range(config.epochs):
    losses = []
    start = time.perf_counter()
    eval_time = 0.0
    for batch in input_pipeline.iterate(
      train, config.batch_size, seed=config.seed, epoch=epoch
    ):
      losses.append(train_step(model, optimizer, batch["image"], batch["label"]))
      step += 1
      bar.update(1)
      if config.eval_every and step % config.eval_every == 0:
        eval_start = time.perf_counter()
        results["curve"].append({"step": step, "test_accuracy": test_accuracy()})
        eval_time += time.perf_counter() - eval_start
    train_loss = float(np.mean(jax.device_get(losses)))  # Waits for the steps.
    elapsed = time.perf_counter() - start - eval_time
    acc = test_accuracy()
    if not results["curve"] or results["curve"][-1]["step"] != step:
      results["curve"].append({"step": step, "test_accuracy": acc})
    entry = {
      "epoch": epoch + 1,
      "step": step,
      "train_loss": train_loss,
      "test_accuracy": acc,
      "images_per_s": len(losses) * config.batch_size / elapsed,
      "layer_stats": _to_json(optax_lgm.layer_stats(optimizer.opt_state)),
    }
    results["history"].append(entry)
    bar.set_postfix(loss=f"{train_loss:.3f}", acc=f"{acc:.3f}")
    write()
  bar.close()

  results["final_test_accuracy"] = (
    results["history"][-1]["test_accuracy"] if (results["history"]) else test_accuracy()
  )
  results["robustness"] = {}
  if config.robustness:
    results["robustness"] = robustness.evaluate_robustness(
      model,
      test_images,
      test_labels,
      key=jax.random.key(config.seed + 1),
      eps_list=config.eps_list,
      sigmas=config.sigmas,
      pgd_steps=config.pgd_steps,
    )
  write()
  return results


def main(argv: list[str] | None = None) -> dict:
  """Command line: trains one run and prints its metrics; returns its results."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  defaults = Config()
  parser.add_argument("--dataset", default=defaults.dataset)
  parser.add_argument("--model", default=defaults.model, choices=models.MODELS)
  parser.add_argument("--optimizer", default=defaults.optimizer, choices=OPTIMIZERS)
  parser.add_argument("--learning_rate", type=float, default=None)
  parser.add_argument("--epochs", type=int, default=defaults.epochs)
  parser.add_argument("--batch_size", type=int, default=defaults.batch_size)
  parser.add_argument("--seed", type=int, default=defaults.seed)
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--eval_every", type=int, default=defaults.eval_every)
  parser.add_argument("--pgd_steps", type=int, default=defaults.pgd_steps)
  parser.add_argument("--no_robustness", action="store_true")
  parser.add_argument("--workdir", default=None, help="default: workdir/OPTIMIZER")
  args = parser.parse_args(argv)
  config = Config(
    dataset=args.dataset,
    model=args.model,
    optimizer=args.optimizer,
    learning_rate=args.learning_rate,
    epochs=args.epochs,
    batch_size=args.batch_size,
    seed=args.seed,
    data_dir=args.data_dir,
    eval_every=args.eval_every,
    pgd_steps=args.pgd_steps,
    robustness=not args.no_robustness,
  )
  workdir = args.workdir or os.path.join("workdir", args.optimizer)
  results = train_and_evaluate(config, workdir)
  for entry in results["history"]:
    print(
      f"epoch {entry['epoch']}: step {entry['step']} loss {entry['train_loss']:.4f} "
      f"test acc {entry['test_accuracy']:.4f} {entry['images_per_s']:.0f} images/s"
    )
  for name, value in results["robustness"].items():
    print(f"{name}: {value:.4f}")
  print(f"metrics: {os.path.join(workdir, 'metrics.json')}")
  return results


if __name__ == "__main__":
  main()
