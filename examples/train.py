"""Trains an image classifier with one optimizer and evaluates its robustness.

`train_and_evaluate(config, workdir)` trains a model of `examples.models` with
the jitted `train_step` through `examples.loop.run`, writes
``workdir/metrics.json`` and evaluates the final model's robustness. A run
stopped and resumed (``--resume``) ends as a run never stopped, bit for bit:
a batch is a function of the seed and the step, and the checkpoint holds the
step, the metrics, the epoch's losses so far and `optax_lgm.StaticSelection`'s
host state. ``python -m examples.train --help`` lists the settings (`Config`).
"""

import dataclasses
import functools
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_lgm
from examples import (
  checkpointing,
  distributed,
  input_pipeline,
  loop,
  models,
  robustness,
)
from examples.config import (
  RESUME_KEYS,
  Config,
  UsageError,
  check,
  host_schedule,
  parse,
  with_learning_rate,
)
from examples.distributed import enable_compilation_cache, share_forward_passes
from examples.optimizers import NonFiniteError, nonfinite_steps, optimizer_of


def loss_fn(model: nnx.Module, images: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy, in float32 whatever the model computes in."""
  logits = model(images).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit(static_argnames=("selection", "perturb"))
def train_step(model, optimizer, images, labels, selection=None, perturb=None):
  """One step: the gradient, then the optimizer's update; returns the loss.

  ``grad_fn`` is the second pass of ``sam`` and ``layer_sam`` (the others
  ignore it); ``selection`` is static ``layer_sam``'s fixed selection (see
  `optax_lgm.StaticSelection`), ``perturb`` whether this step runs their
  second pass when the host decides it (``None``: their schedule does). A
  non-finite batch leaves the BatchNorm statistics as they were.
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


@functools.lru_cache(maxsize=1)
def load_dataset(name: str, data_dir: str | None):
  """The decoded train and test splits and the metadata (the last one read stays)."""
  try:
    train_source, test_source, meta = input_pipeline.get_datasets(name, data_dir)
  except (ValueError, FileNotFoundError) as error:  # Unknown or missing data.
    raise UsageError(str(error)) from error
  load = input_pipeline.load_split
  return load(train_source), load(test_source), meta


def hold_out(train, num_examples: int):
  """`input_pipeline.hold_out`, its error a `UsageError` naming the flag."""
  try:
    return input_pipeline.hold_out(train, num_examples)
  except ValueError as error:
    raise UsageError(f"--validation: {error}") from error


def train_and_evaluate(config: Config, workdir: str | os.PathLike[str]) -> dict:
  """Trains a model as ``config`` says and evaluates it; returns the metrics.

  Raises:
    UsageError: settings that cannot work (message says what to change).
    NonFiniteError: after ``config.skip_nonfinite`` non-finite steps in a row.
  """
  check(config)
  enable_compilation_cache(config.compilation_cache)
  mesh = distributed.make_mesh(config.mesh, config.batch_size)
  workdir = pathlib.Path(workdir).resolve()
  workdir.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  train, test, meta = load_dataset(config.dataset, config.data_dir)
  if config.validation:  # Training loses them in any case; evaluation may use them.
    train, validation = hold_out(train, config.validation)
    test = validation if config.evaluate_on == "validation" else test
  per_epoch = len(train["label"]) // config.batch_size
  if not per_epoch:
    raise UsageError(
      f"batch_size={config.batch_size} exceeds the {len(train['label'])} "
      f"training examples of {config.dataset!r}"
    )
  total = int(min(config.epochs * per_epoch, config.max_steps or np.inf))
  rngs = nnx.Rngs(jax.random.key(config.seed, impl="rbg"))
  data = (meta.num_classes, meta.input_shape, meta.mean, meta.std)
  model = models.create_model(config.model, *data, rngs, dtype=jnp.dtype(config.dtype))
  tx = optimizer_of(config, model.layer_axes, total)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  for node in (model, optimizer):
    nnx.update(node, distributed.replicate(nnx.state(node), mesh))
  step_fn = train_step
  if static := config.optimizer == "layer_sam" and config.layer_sam_mode == "static":
    step_fn = optax_lgm.StaticSelection(
      train_step, every=config.reselect_every, total_steps=total,
      start=model.output_layers if config.layer_sam_start == "output" else None,
      background=config.layer_sam_compile == "background",
      payoff=config.layer_sam_payoff,
    )  # fmt: skip
  metrics = loop.Metrics(
    config.target_accuracy, config=dataclasses.asdict(config),
    learning_rate=with_learning_rate(config).learning_rate,
    devices={"data": mesh.devices.size, "processes": jax.process_count()},
    evaluated_on=config.evaluate_on,
    compile={"compilations": 0, "critical_seconds": 0.0, "background_seconds": 0.0},
  )  # fmt: skip
  checkpoints = checkpointing.Checkpoints(workdir / "checkpoints", resume=config.resume)
  losses, start = [], 0  # The losses of this epoch so far.

  def write() -> None:
    if static:
      log = metrics.data["layer_sam_static"] = step_fn.log()
      metrics.data["compile"] = {"compilations": step_fn.compilations} | {
        f"{k}_seconds": log[f"compile_seconds_{k}"] for k in ("critical", "background")
      }
    metrics.data["skipped_steps"] = nonfinite_steps(optimizer.opt_state)[1]
    if is_main:
      metrics.write(workdir / "metrics.json")

  def save(step: int) -> None:
    if config.checkpoints:
      checkpoints.save(model, optimizer, {
        "step": step, "metrics": metrics.copy(),
        "losses": [float(x) for x in jax.device_get(losses)],  # Exact.
        "static_selection": step_fn.state_dict() if static else {},
      })  # fmt: skip

  def accuracy() -> float:
    acc = float(robustness.accuracy(model, test["image"], test["label"]))
    model.train()
    return acc

  every, programs = host_schedule(config), set()  # The host's SAM steps.

  def step(state, indexed_batch):
    i, batch = indexed_batch
    batch, t0 = distributed.shard_batch(batch, mesh), time.perf_counter()
    extra = {"perturb": i % every == 0} if every else {}
    losses.append(step_fn(model, optimizer, batch["image"], batch["label"], **extra))
    if not static and (program := tuple(extra.values())) not in programs:
      programs.add(program)  # This process's first call of a program compiles
      record = metrics.data["compile"]  # (or loads) it: its seconds in all.
      record["critical_seconds"] += time.perf_counter() - t0
      record["compilations"] = len(programs)
    return state, losses[-1]

  def entry(step: int, acc: float) -> None:
    """The history entry of an epoch, or of the part of it that ran."""
    nonlocal began
    metrics.data["history"].append({
      "epoch": -(-step // per_epoch), "step": step,
      "train_loss": float(np.nanmean(jax.device_get(losses))),  # Skipped: NaN.
      "test_accuracy": acc,
      "images_per_s": (step - began[0]) * config.batch_size
      / (metrics.data["train_seconds"] - began[1]),
      "layer_stats": loop.layer_stats(optimizer.opt_state),
    })  # fmt: skip
    began = (step, metrics.data["train_seconds"])

  def evaluated(step: int, _) -> None:  # The clock is stopped.
    if not step % per_epoch:  # An epoch's end: its entry, then a checkpoint.
      entry(step, metrics.data["curve"][-1]["test_accuracy"])
      losses.clear()
      save(step)
      checkpoints.manager.wait_until_finished()  # Keeps the save off the clock.
      write()

  def after_step(step: int, state, loss) -> None:
    if config.skip_nonfinite and (
      nonfinite_steps(optimizer.opt_state)[0] >= config.skip_nonfinite
    ):
      metrics.data["stopped"] = (
        f"stopped at step {step}: {config.skip_nonfinite} steps in a row had a "
        "non-finite gradient; lower --learning_rate or check the data"
      )
      write()
      raise NonFiniteError(metrics.data["stopped"])
    if config.checkpoint_every and not step % config.checkpoint_every:
      save(step)  # Not again at an epoch's end (Checkpoints.save skips it).

  try:
    if config.resume and (progress := checkpoints.restore(
      model, optimizer, config, RESUME_KEYS
    )):  # fmt: skip
      start, losses[:] = progress["step"], map(np.float32, progress["losses"])
      metrics.data = {**progress["metrics"], "config": metrics.data["config"]}
      if static:
        step_fn.load_state_dict(progress["static_selection"])
    if config.resume and is_main:
      where = f"resuming {workdir} from step {start}"
      print(where if start else f"no checkpoint in {workdir}: starting from step 0")
    began = (start, metrics.data["train_seconds"])
    model.train()
    loop.run(
      step, (model, optimizer),
      lambda i: (i, input_pipeline.batch_at(train, config.batch_size, config.seed, i)),
      range(start, total), metrics, evaluate=lambda _: accuracy(),
      eval_at=lambda i: not i % per_epoch
      or bool(config.eval_every and not i % config.eval_every),
      evaluated=evaluated, after_step=after_step,
      progress=f"{config.optimizer} seed {config.seed}"
      if config.progress and is_main else None,
    )  # fmt: skip
    if total % per_epoch and start < total:  # Stopped inside an epoch:
      save(total)  # before its partial entry, which a resumed run writes whole.
      entry(total, accuracy())
      write()
  finally:
    checkpoints.close()  # Waits for the checkpoints being written.
    if static:
      step_fn.close()
  results = metrics.data
  history = results["history"]
  results[f"final_{config.evaluate_on}_accuracy"] = (
    history[-1]["test_accuracy"] if history else accuracy()
  )
  results["robustness"] = {}
  if config.robustness:
    settings = {k: getattr(config, k) for k in ("eps_list", "sigmas", "pgd_steps")}
    n = config.robustness_examples
    results["robustness"] = robustness.evaluate_robustness(
      model, test["image"][:n], test["label"][:n], key=jax.random.key(config.seed + 1),
      **settings,
    )  # fmt: skip
  write()
  return results


def main(argv: list[str] | None = None) -> dict:
  """Command line: trains one run and prints its metrics; returns its results."""
  share_forward_passes()
  args = parse(argv, prog="python -m examples.train")
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
