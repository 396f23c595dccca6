"""Trains an image classifier with one optimizer and evaluates its robustness.

`train_and_evaluate(config, workdir)` trains with `train_step` and writes
``workdir/metrics.json``; a run resumed with ``--resume`` ends as a run never
stopped, bit for bit. ``python -m examples.train --help`` lists the settings.
"""

import os
import sys

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import optax_lgm
from examples import config as config_lib
from examples import distributed, input_pipeline, loop, models, robustness
from examples.config import Config, UsageError
from examples.optimizers import NonFiniteError, optimizer_of


def loss_fn(model: nnx.Module, images: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy, in float32 whatever the model computes in."""
  logits = model(images).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit(static_argnames=("selection", "perturb"))
def train_step(model, optimizer, images, labels, selection=None, perturb=None):
  """One step: the gradient, then the optimizer's update; returns the loss.

  ``grad_fn`` is SAM's second pass; ``selection`` static ``layer_sam``'s (see
  `optax_lgm.StaticSelection`); ``perturb`` the host's decision to run it.
  """
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  rest = nnx.as_pure(rest)  # The second pass leaves BatchNorm statistics alone.

  def grad_fn(params, _):  # The gradient at SAM's perturbed parameters.
    return jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), images, labels))(
      params
    )

  statistics = nnx.as_pure(nnx.state(model, nnx.BatchStat))
  loss, grads = nnx.value_and_grad(loss_fn)(model, images, labels)
  new, ok = nnx.as_pure(nnx.state(model, nnx.BatchStat)), jnp.isfinite(loss)
  nnx.update(model, jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, statistics))
  extra = {"selection": selection, "perturb": perturb}
  extra = {name: value for name, value in extra.items() if value is not None}
  optimizer.update(model, grads, grad_fn=grad_fn, **extra)
  return loss


def splits(config: Config):
  """`input_pipeline.splits` of ``config``: train, evaluation, metadata."""
  data = (config.dataset, config.data_dir, config.validation, config.evaluate_on)
  try:
    return input_pipeline.splits(*data)
  except (ValueError, FileNotFoundError) as error:  # Unknown or missing data.
    raise UsageError(str(error)) from error


def create(config: Config, meta, total: int, mesh: jax.sharding.Mesh):
  """The model, its optimizer (both replicated over ``mesh``) and the step."""
  rngs = nnx.Rngs(jax.random.key(config.seed, impl="rbg"))
  data = (meta.num_classes, meta.input_shape, meta.mean, meta.std)
  model = models.create_model(config.model, *data, rngs, dtype=jnp.dtype(config.dtype))
  tx = optimizer_of(config, model.layer_axes, total)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  for node in (model, optimizer):
    nnx.update(node, distributed.replicate(nnx.state(node), mesh))
  if not config_lib.static_layer_sam(config):
    return model, optimizer, loop.Compilations(train_step)
  return model, optimizer, optax_lgm.StaticSelection(
    train_step, every=config.reselect_every, total_steps=total,
    start=model.output_layers if config.layer_sam_start == "output" else None,
    background=config.layer_sam_compile == "background",
    payoff=config.layer_sam_payoff,
  )  # fmt: skip


def train_and_evaluate(config: Config, workdir: str | os.PathLike[str]) -> dict:
  """Trains a model as ``config`` says and evaluates it; returns the metrics.

  Raises:
    UsageError: settings that cannot work (message says what to change).
    NonFiniteError: after ``config.skip_nonfinite`` non-finite steps in a row.
  """
  config_lib.check(config)
  distributed.enable_compilation_cache(config.compilation_cache)
  mesh = distributed.make_mesh(config.mesh, config.batch_size)
  train, test, meta = splits(config)
  per_epoch, total = config_lib.steps(config, len(train["label"]))
  model, optimizer, step_fn = create(config, meta, total, mesh)
  every = config_lib.host_schedule(config)  # The host's SAM steps (0: none).

  def step(i: int) -> jax.Array:  # Step i (from 0) on its batch: the loss.
    batch = input_pipeline.batch_at(train, config.batch_size, config.seed, i)
    batch = distributed.shard_batch(batch, mesh)
    extra = {"perturb": i % every == 0} if every else {}
    return step_fn(model, optimizer, batch["image"], batch["label"], **extra)

  trainer = loop.Trainer(config, workdir, mesh, model, optimizer, step_fn, test)
  trainer.train(step, per_epoch, total)
  if config.robustness:
    n = config.robustness_examples
    trainer.data["robustness"] = robustness.evaluate_robustness(
      model, test["image"][:n], test["label"][:n], key=jax.random.key(config.seed + 1),
      eps_list=config.eps_list, sigmas=config.sigmas, pgd_steps=config.pgd_steps,
    )  # fmt: skip
  trainer.write()
  return trainer.data


def main(argv: list[str] | None = None) -> dict:
  """Command line: trains one run and prints its metrics; returns its results."""
  distributed.share_forward_passes()
  args = config_lib.parse(argv, prog="python -m examples.train")
  try:
    if args.distributed:
      distributed.initialize(*args.cluster)
    results = train_and_evaluate(args.config, args.workdir)
  except (UsageError, NonFiniteError) as error:  # One line, no traceback.
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2 if isinstance(error, UsageError) else 1)
  print(loop.summary(results), f"metrics: {args.workdir}/metrics.json", sep="\n")
  return results


if __name__ == "__main__":
  main()
