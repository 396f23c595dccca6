"""Trains an image classifier with one optimizer and evaluates its robustness.

`train_and_evaluate(config, workdir)` trains a model of `examples.models` on a
dataset of `examples.input_pipeline` with ``nnx.Optimizer(model, tx,
wrt=nnx.Param)`` and the jitted `train_step`, records per-epoch metrics in
``workdir/metrics.json``, and evaluates the final model with
`examples.robustness.evaluate_robustness`. The settings are `Config`
(`examples.config`); checkpoints and resuming are in `examples.checkpointing`,
the data-parallel mesh and several hosts in `examples.distributed`.

Command line (``--help`` lists every setting with its default)::

  python -m examples.train --optimizer lgm --epochs 5 --workdir /tmp/lgm
  python -m examples.train --optimizer lgm --epochs 5 --workdir /tmp/lgm --resume

A run stopped and resumed ends with the same parameters, bit for bit, and the
same ``metrics.json`` (times aside) as a run never stopped: the data order is
a function of ``(seed, epoch)``, the batches already used are skipped, and the
host state of `optax_lgm.StaticSelection` is checkpointed.
"""

import functools
import importlib.util
import itertools
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache

import optax_lgm
from examples import checkpointing, distributed, input_pipeline, models, robustness
from examples.config import RESUME_KEYS, Config, UsageError, check, parse
from examples.metrics import Metrics, layer_stats, metrics_summary
from examples.optimizers import cached_optimizer, nonfinite_steps


class NonFiniteError(RuntimeError):
  """Too many steps in a row had a non-finite gradient."""


def loss_fn(model: nnx.Module, images: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy, in float32 whatever the model computes in."""
  logits = model(images).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit(static_argnames="selection")
def train_step(model, optimizer, images, labels, selection=None):
  """One step: the gradient, then the optimizer's update; returns the loss.

  ``grad_fn`` is the second pass of ``sam`` and ``layer_sam`` (the others
  ignore it); ``selection`` is static ``layer_sam``'s fixed selection (see
  `optax_lgm.StaticSelection`).
  """
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  rest = nnx.as_pure(rest)  # The second pass leaves BatchNorm statistics alone.

  def grad_fn(params, _):  # The gradient at SAM's perturbed parameters.
    def perturbed_loss(p):
      return loss_fn(nnx.merge(graphdef, p, rest), images, labels)

    return jax.grad(perturbed_loss)(params)

  statistics = nnx.as_pure(nnx.state(model, nnx.BatchStat))
  loss, grads = nnx.value_and_grad(loss_fn)(model, images, labels)
  # A non-finite batch leaves the BatchNorm statistics as they were.
  new = nnx.as_pure(nnx.state(model, nnx.BatchStat))
  ok = jnp.isfinite(loss)
  nnx.update(model, jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, statistics))
  extra = {} if selection is None else {"selection": selection}
  optimizer.update(model, grads, grad_fn=grad_fn, **extra)
  return loss


def enable_compilation_cache(path: str) -> None:
  """Keeps every compiled program in JAX's persistent cache at ``path``.

  Programs of any compile time are kept (the CPU's take seconds, below JAX's
  default threshold), so a rerun or a resumed run loads them. ``''``: off.
  """
  if not path:
    return
  path = os.path.expanduser(path)
  if jax.config.jax_compilation_cache_dir != path:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()  # Takes the new directory from now on.


@functools.lru_cache(maxsize=1)
def _load_dataset(name: str, data_dir: str | None):
  """The decoded train and test splits (the last one read stays in memory)."""
  try:
    train_source, test_source, meta = input_pipeline.get_datasets(name, data_dir)
  except (ValueError, FileNotFoundError) as error:  # Unknown or missing data.
    raise UsageError(str(error)) from error
  load = input_pipeline.load_split
  return load(train_source), load(test_source), meta


def train_and_evaluate(config: Config, workdir: str | os.PathLike[str]) -> dict:
  """Trains a model as ``config`` says and evaluates it.

  Returns:
    What ``workdir/metrics.json`` holds (see `examples.metrics`).

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
  train, test, meta = _load_dataset(config.dataset, config.data_dir)
  steps_per_epoch = len(train["label"]) // config.batch_size
  if not steps_per_epoch:
    raise UsageError(
      f"batch_size={config.batch_size} exceeds the {len(train['label'])} "
      f"training examples of {config.dataset!r}"
    )
  total_steps = min(config.epochs * steps_per_epoch, config.max_steps or np.inf)

  rngs = nnx.Rngs(jax.random.key(config.seed, impl="rbg"))
  data = (meta.num_classes, meta.input_shape, meta.mean, meta.std)
  model = models.create_model(config.model, *data, rngs, dtype=jnp.dtype(config.dtype))
  tx = cached_optimizer(
    config.optimizer,
    config.learning_rate,
    model.layer_axes,
    grad_accum=config.grad_accum,
    skip_nonfinite=config.skip_nonfinite,
    sam_schedule=config.sam_schedule,
    sam_every=config.sam_every,
    sam_probability=config.sam_probability,
    sam_skipped=config.sam_skipped,
    total_steps=int(total_steps),
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  nnx.update(model, distributed.replicate(nnx.state(model), mesh))
  nnx.update(optimizer, distributed.replicate(nnx.state(optimizer), mesh))
  step_fn = train_step
  if config.optimizer == "layer_sam" and config.layer_sam_mode == "static":
    step_fn = optax_lgm.StaticSelection(
      train_step,
      every=config.reselect_every,
      start=model.output_layers if config.layer_sam_start == "output" else None,
      background=config.layer_sam_compile == "background",
      payoff=config.layer_sam_payoff,
      total_steps=int(total_steps),
    )

  metrics = Metrics(
    config,
    config.target_accuracy,
    devices={"data": mesh.devices.size, "processes": jax.process_count()},
  )
  results = metrics.data
  step, epoch_losses = 0, []
  checkpoints = checkpointing.Checkpoints(workdir / "checkpoints", resume=config.resume)

  def write() -> None:
    if isinstance(step_fn, optax_lgm.StaticSelection):
      results["layer_sam_static"] = step_fn.log()
      results["compile"] = {
        "compilations": step_fn.compilations,
        "critical_seconds": step_fn.log()["compile_seconds_critical"],
        "background_seconds": step_fn.log()["compile_seconds_background"],
      }
    results["skipped_steps"] = nonfinite_steps(optimizer.opt_state)[1]
    if is_main:
      metrics.write(workdir / "metrics.json")

  def save(losses: list) -> None:
    if config.checkpoints:
      progress = {
        "step": step,
        "epoch_losses": [float(x) for x in jax.device_get(losses)],  # Exact.
        "metrics": metrics.copy(),
        "static_selection": getattr(step_fn, "state_dict", dict)(),
      }
      checkpoints.save(model, optimizer, progress)

  def accuracy() -> float:
    acc = float(robustness.accuracy(model, test["image"], test["label"]))
    model.train()
    return acc

  def evaluate() -> float:
    """Evaluates with the training clock stopped."""
    jax.block_until_ready(nnx.state(model))  # The steps are on the clock.
    metrics.stop_clock()
    acc = accuracy()
    metrics.evaluated(step, acc)
    metrics.start_clock()
    return acc

  try:
    progress = None
    if config.resume:
      progress = checkpoints.restore(model, optimizer, config, RESUME_KEYS)
    if progress:
      step, epoch_losses = progress["step"], progress["epoch_losses"]
      metrics.data = results = {**progress["metrics"], "config": metrics.data["config"]}
      if isinstance(step_fn, optax_lgm.StaticSelection):
        step_fn.load_state_dict(progress["static_selection"])
    # Compilation: StaticSelection keeps its own record (write() copies it);
    # for the others, this process's first step call compiles (or loads) it.
    compile_record = results.setdefault(
      "compile", {"compilations": 0, "critical_seconds": 0.0, "background_seconds": 0.0}
    )
    compiled = isinstance(step_fn, optax_lgm.StaticSelection)
    if config.resume and is_main:
      print(
        f"resuming {workdir} from step {step}"
        if progress
        else f"no checkpoint in {workdir}: starting from step 0"
      )
    bar = tqdm.tqdm(
      total=total_steps,
      initial=min(step, total_steps),
      leave=False,
      desc=f"{config.optimizer} seed {config.seed}",
      disable=not (config.progress and is_main),
    )
    model.train()
    for epoch in range(step // steps_per_epoch, config.epochs):
      if step >= total_steps:
        break
      skip = step - epoch * steps_per_epoch  # Resumed inside the epoch.
      losses = [np.float32(x) for x in epoch_losses] if skip else []
      batches = input_pipeline.iterate(
        train, config.batch_size, seed=config.seed, epoch=epoch
      )
      checkpoints.manager.wait_until_finished()  # Keeps the last save off the clock.
      seconds_before = results["train_seconds"]
      metrics.start_clock()
      for batch in itertools.islice(batches, skip, skip + total_steps - step):
        batch = distributed.shard_batch(batch, mesh)
        began = time.perf_counter()
        losses.append(step_fn(model, optimizer, batch["image"], batch["label"]))
        if not compiled:  # This process's first call compiles (or loads) it.
          compiled = True
          compile_record["critical_seconds"] += time.perf_counter() - began
          compile_record["compilations"] = 1  # One program, however many processes.
        step += 1
        bar.update(1)
        if nonfinite_steps(optimizer.opt_state)[0] >= config.skip_nonfinite > 0:
          results["stopped"] = (
            f"stopped at step {step}: {config.skip_nonfinite} steps in a row had a "
            "non-finite gradient; lower --learning_rate or check the data"
          )
          write()
          raise NonFiniteError(results["stopped"])
        if config.eval_every and step % config.eval_every == 0:
          evaluate()
        if config.checkpoint_every and step % config.checkpoint_every == 0:
          if step % steps_per_epoch:  # An epoch's end is saved with its entry.
            save(losses)
      finished = step == (epoch + 1) * steps_per_epoch
      if not finished:  # Stopped by max_steps: save before the partial entry.
        save(losses)
      acc = evaluate()
      train_loss = float(np.nanmean(jax.device_get(losses)))  # Skipped: NaN.
      images = (step - epoch * steps_per_epoch - skip) * config.batch_size
      results["history"].append({
        "epoch": epoch + 1, "step": step, "train_loss": train_loss,
        "test_accuracy": acc,
        "images_per_s": images / (results["train_seconds"] - seconds_before),
        "layer_stats": layer_stats(optimizer.opt_state),
      })  # fmt: skip
      bar.set_postfix(loss=f"{train_loss:.3f}", acc=f"{acc:.3f}")
      if finished:
        save([])
      write()
    bar.close()
  finally:
    checkpoints.close()  # Waits for the checkpoints being written.
    if isinstance(step_fn, optax_lgm.StaticSelection):
      step_fn.close()

  results["final_test_accuracy"] = (
    results["history"][-1]["test_accuracy"] if results["history"] else accuracy()
  )
  results["robustness"] = {}
  if config.robustness:
    settings = {k: getattr(config, k) for k in ("eps_list", "sigmas", "pgd_steps")}
    key = jax.random.key(config.seed + 1)
    n = config.robustness_examples
    results["robustness"] = robustness.evaluate_robustness(
      model, test["image"][:n], test["label"][:n], key=key, **settings
    )
  write()
  return results


def share_forward_passes() -> None:
  """On a CPU-only host, lets XLA share SAM's two forward passes up to a layer.

  XLA:CPU's ``reshape-mover`` pass rewrites the BatchNorm arithmetic of the
  two passes differently, so a static ``layer_sam`` step computes its second
  forward pass again (see `optax_lgm.layer_sam`); without the pass the step
  that perturbs the output-side layers costs about an SGD step. Measured on a
  ResNet-20, the other optimizers' steps are unchanged. Takes effect only
  before JAX starts its backend, and leaves an ``XLA_FLAGS`` that already
  disables passes, or a host with a GPU or TPU plugin, alone.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "libtpu")
  if "xla_disable_hlo_passes" in flags or any(
    importlib.util.find_spec(name) for name in plugins
  ):
    return
  os.environ["XLA_FLAGS"] = f"{flags} --xla_disable_hlo_passes=reshape-mover".strip()


def main(argv: list[str] | None = None) -> dict:
  """Command line: trains one run and prints its metrics; returns its results."""
  share_forward_passes()
  args = parse(argv, __doc__.splitlines()[0], prog="python -m examples.train")
  try:
    if args.distributed:
      distributed.initialize(*args.cluster)
    results = train_and_evaluate(args.config, args.workdir)
  except (UsageError, NonFiniteError) as error:  # One line, no traceback.
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2 if isinstance(error, UsageError) else 1)
  print(metrics_summary(results), f"metrics: {args.workdir}/metrics.json", sep="\n")
  return results


if __name__ == "__main__":
  main()
