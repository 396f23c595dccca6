"""Trains an image classifier with one optimizer and evaluates its robustness.

Public API::

  Config                          the settings of one run (a dataclass)
  OPTIMIZERS                      names accepted by `make_optimizer`
  DEFAULT_LEARNING_RATES          the learning rate each name uses by default
  make_optimizer(name, learning_rate=None, layer_axes=None)
      -> optax.GradientTransformation
  make_mesh(spec="auto") -> jax.sharding.Mesh
  train_and_evaluate(config, workdir) -> dict

`train_and_evaluate` trains a model of `examples.models` on a dataset of
`examples.input_pipeline` with ``nnx.Optimizer(model, tx, wrt=nnx.Param)``
and a jitted step (``sam`` and ``layer_sam`` get the ``grad_fn`` of their
second pass), records per-epoch metrics (train loss, test accuracy, images/s,
steps so far, `optax_lgm.layer_stats` of the optimizer state) in
``workdir/metrics.json``, and evaluates the final model with
`examples.robustness.evaluate_robustness`.

Checkpoints (unless ``Config.checkpoints`` is false). Every
``Config.checkpoint_every`` steps, at the end of every epoch and where
``Config.max_steps`` stops the run, an `orbax.checkpoint` checkpoint is
written to ``workdir/checkpoints/STEP`` (the last two are kept). It holds
``nnx.state(model)`` (parameters and BatchNorm statistics, and any PRNG state,
which the models here do not have), ``nnx.state(optimizer)`` (the step count
and the optax state) and, as JSON, the step, the losses of the current epoch
and the metrics so far. With ``Config.resume`` (``--resume``) the run
restores the latest checkpoint of ``workdir`` and goes on from there. The
data order is a function of ``(seed, epoch)`` (see
`examples.input_pipeline.iterate`) and the batches already used in the
current epoch are skipped, so a run stopped and resumed ends with the same
parameters, bit for bit, and the same ``metrics.json`` (throughput aside) as
a run that was never stopped. Without ``resume``, an existing
``workdir/checkpoints`` is deleted when the run starts.

Data parallelism. The step runs on a one-axis ``"data"`` mesh (`make_mesh`;
``Config.mesh``, ``--mesh``; default: every device): each batch is split over
the devices of the axis, the model and optimizer states are replicated, and
XLA sums the gradients across devices. On one device this changes nothing.
The batch size must be a multiple of the number of devices.

Several hosts: run the same command on every host with ``--distributed``,
which calls ``jax.distributed.initialize()`` before JAX does anything else
(it finds the coordinator and the process ids on SLURM, Open MPI, Kubernetes
and Cloud TPU; elsewhere give them with ``--coordinator_address HOST:PORT
--num_processes N --process_id I``), with the same ``--workdir`` on a shared
file system. ``--mesh auto`` then spans the devices of all hosts. Every host
reads the whole global batch (the datasets here are small and held in
memory) and hands its own devices their rows with
``jax.make_array_from_callback``; for a large dataset, let each host read
only its slice and build the global batch with
``jax.make_array_from_process_local_data``. Only process 0 writes
``metrics.json``; orbax coordinates the checkpoint writes.

Command line::

  python examples/train.py --optimizer lgm --epochs 5 [--workdir DIR]
      [--resume] [--max_steps N] [--checkpoint_every N] [--mesh data=8]
      [--distributed [--coordinator_address HOST:PORT --num_processes N
      --process_id I]]
"""

import argparse
import dataclasses
import functools
import itertools
import json
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

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

CHECKPOINT_DIR = "checkpoints"
"""The folder of ``workdir`` that holds the orbax checkpoints."""

RESUME_KEYS = ("dataset", "model", "optimizer", "learning_rate", "batch_size", "seed")
"""Settings that a resumed run must share with the run of its checkpoint."""


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
    max_steps: stop after this many steps in all (counting the steps before
      a resume), with a checkpoint; ``None``: train all ``epochs``. The
      history entry of an epoch cut short covers the steps it ran.
    checkpoints: whether to write checkpoints (`examples.compare`, whose
      workdirs are temporary, does not).
    checkpoint_every: also write a checkpoint every this many steps (0: only
      at the end of each epoch and at ``max_steps``).
    resume: whether to go on from the latest checkpoint in ``workdir``, if
      there is one; if false, existing checkpoints are deleted.
    mesh: the devices of the data-parallel ``"data"`` axis: ``"auto"`` for
      all, ``"data=N"`` for the first N (see `make_mesh`).
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
  max_steps: int | None = None
  checkpoints: bool = True
  checkpoint_every: int = 500
  resume: bool = False
  mesh: str = "auto"


def make_optimizer(
  name: str,
  learning_rate: float | None = None,
  layer_axes: Callable[[tuple, Any], int] | None = None,
) -> optax.GradientTransformation:
  """Builds an optimizer by name.

  Args:
    name: one of `OPTIMIZERS`.
    learning_rate: ``None`` for ``DEFAULT_LEARNING_RATES[name]``.
    layer_axes: the ``layer_axes`` of ``lgm``, ``dgs`` and ``layer_sam``
      (`examples.models.layer_axes_of` gives the one of a model); the other
      optimizers have no layers.

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
    return optax_lgm.lgm(lr, layer_axes=layer_axes)
  if name == "dgs":
    return optax_lgm.dgs(lr, layer_axes=layer_axes)
  return optax_lgm.layer_sam(
    optax.sgd(lr, momentum=0.9), rho=SAM_RHO, k=2, layer_axes=layer_axes
  )


def make_mesh(spec: str = "auto") -> jax.sharding.Mesh:
  """Builds the one-axis ``"data"`` mesh of data-parallel training.

  Args:
    spec: ``"auto"`` for all devices (``jax.devices()``: those of every host),
      or ``"data=N"`` for the first ``N`` of them.

  Returns:
    A mesh with the one axis ``"data"`` (of type ``Auto``: XLA places what
    the shardings of the inputs do not fix).

  Raises:
    ValueError: if ``spec`` is neither form, or asks for more devices than
      there are.

  Examples:
    >>> make_mesh("data=1").devices.shape
    (1,)
  """
  devices = jax.devices()
  if spec == "auto":
    size = len(devices)
  else:
    name, _, value = spec.partition("=")
    if name.strip() != "data" or not value.strip().isdigit():
      raise ValueError(f"mesh must be 'auto' or 'data=N', got mesh={spec!r}.")
    size = int(value)
    if not 1 <= size <= len(devices):
      raise ValueError(
        f"mesh={spec!r} asks for {size} devices; there are {len(devices)}."
      )
  return jax.make_mesh(
    (size,), ("data",), (jax.sharding.AxisType.Auto,), devices=devices[:size]
  )


def _shard(
  batch: input_pipeline.Batch, sharding: NamedSharding
) -> dict[str, jax.Array]:
  """Gives each device of ``sharding`` its rows of a global batch."""
  return {
    key: jax.make_array_from_callback(
      value.shape, sharding, lambda index, value=value: value[index]
    )
    for key, value in batch.items()
  }


def _is_key(x: jax.Array) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _saveable(node: nnx.Module | nnx.Optimizer) -> dict:
  """The arrays of ``nnx.state(node)``, PRNG keys (of dropout) as raw data."""
  return jax.tree.map(
    lambda x: jax.random.key_data(x) if _is_key(x) else x,
    nnx.to_pure_dict(nnx.state(node)),
  )


def _load(node: nnx.Module | nnx.Optimizer, saved: dict) -> None:
  """Puts arrays from `_saveable` back into ``node``.

  Only arrays are saved: the static parts of the optimizer state (such as the
  layer names of `optax_lgm.lgm`) come from ``node``, built afresh.
  """
  state = nnx.state(node)
  saved = jax.tree.map(
    lambda x, y: (
      jax.random.wrap_key_data(y, impl=jax.random.key_impl(x)) if _is_key(x) else y
    ),
    nnx.to_pure_dict(state),
    saved,
  )
  nnx.replace_by_pure_dict(state, saved)
  nnx.update(node, state)


def _save(
  manager: ocp.CheckpointManager,
  model: nnx.Module,
  optimizer: nnx.Optimizer,
  progress: dict,
) -> None:
  """Writes a checkpoint (in the background) at step ``progress['step']``."""
  if manager.latest_step() == progress["step"]:
    return  # Written already: max_steps stopped on a checkpoint_every step.
  manager.save(
    progress["step"],
    args=ocp.args.Composite(
      model=ocp.args.StandardSave(_saveable(model)),
      optimizer=ocp.args.StandardSave(_saveable(optimizer)),
      progress=ocp.args.JsonSave(progress),
    ),
  )


def _restore(
  manager: ocp.CheckpointManager,
  model: nnx.Module,
  optimizer: nnx.Optimizer,
  config: Config,
) -> dict | None:
  """Loads the latest checkpoint into ``model`` and ``optimizer``.

  Returns:
    The ``progress`` dict given to `_save`, or ``None`` without a checkpoint.

  Raises:
    ValueError: if the checkpoint was written with other `RESUME_KEYS`.
  """
  step = manager.latest_step()
  if step is None:
    return None
  target = {
    "model": _saveable(model),
    "optimizer": _saveable(optimizer),
  }
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      model=ocp.args.StandardRestore(target["model"]),
      optimizer=ocp.args.StandardRestore(target["optimizer"]),
      progress=ocp.args.JsonRestore(),
    ),
  )
  progress = restored["progress"]
  saved = progress["config"]
  changed = [k for k in RESUME_KEYS if saved[k] != getattr(config, k)]
  if changed:
    then = ", ".join(f"{k}={saved[k]!r}" for k in changed)
    now = ", ".join(f"{k}={getattr(config, k)!r}" for k in changed)
    raise ValueError(
      f"Cannot resume from {os.fspath(manager.directory)!r}: its checkpoint "
      f"was written with {then}; this run has {now}."
    )
  _load(model, restored["model"])
  _load(optimizer, restored["optimizer"])
  return progress


_cached_optimizer = functools.cache(make_optimizer)
"""`make_optimizer`, returning the same (immutable) transformation each time."""


@functools.lru_cache(maxsize=1)
def _load_dataset(
  name: str, data_dir: str | None
) -> tuple[input_pipeline.Batch, input_pipeline.Batch, input_pipeline.DatasetMetadata]:
  """The decoded train and test splits.

  The last dataset read stays in memory for the next run (several seeds).
  """
  train_source, test_source, meta = input_pipeline.get_datasets(name, data_dir)
  train = input_pipeline.load_split(train_source)
  test = input_pipeline.load_split(test_source)
  return train, test, meta


def _loss(model: nnx.Module, images: jax.Array, labels: jax.Array) -> jax.Array:
  logits = model(images)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.cache
def _make_train_step(needs_grad_fn: bool):
  """Returns the jitted ``(model, optimizer, images, labels) -> loss``.

  Cached, so that runs of the same model and optimizer (several seeds, or a
  run and its resumption) reuse the compiled step: ``nnx.jit`` compiles once
  per graph of its arguments, which holds the optax transformation, so the
  runs also share the transformation (`_cached_optimizer`).
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
      there after every epoch and at the end, the checkpoints under
      ``checkpoints/``.

  Returns:
    ``{'config': dict, 'devices': {'data', 'processes'}, 'history':
    [per-epoch dict], 'curve': [{'step', 'test_accuracy'}],
    'final_test_accuracy': float, 'robustness': dict}``. ``devices`` gives
    the size of the ``"data"`` axis and the number of processes (hosts).
    Each history entry has ``epoch``, ``step`` (steps so far),
    ``train_loss`` (mean over the epoch), ``test_accuracy``, ``images_per_s``
    (training throughput of the epoch, counting only the steps run since the
    process started, compilation included in its first epoch, checkpoints
    written inside the epoch too) and
    ``layer_stats`` (`optax_lgm.layer_stats` of the optimizer state).
    ``robustness`` is the dict of `examples.robustness.evaluate_robustness`
    (empty if ``config.robustness`` is false).

  Raises:
    ValueError: if ``config.batch_size`` is not a multiple of the number of
      devices of ``config.mesh`` or exceeds the training set, or if
      ``config.resume`` finds a checkpoint written with other `RESUME_KEYS`.
  """
  mesh = make_mesh(config.mesh)
  num_devices = mesh.devices.size
  if config.batch_size % num_devices:
    raise ValueError(
      f"batch_size={config.batch_size} is not a multiple of the {num_devices} "
      f"devices of the 'data' axis of mesh={config.mesh!r}."
    )
  data_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  is_main = jax.process_index() == 0

  workdir = pathlib.Path(workdir).resolve()
  workdir.mkdir(parents=True, exist_ok=True)

  train, test, meta = _load_dataset(config.dataset, config.data_dir)
  test_images, test_labels = test["image"], test["label"]

  rngs = nnx.Rngs(jax.random.key(config.seed, impl="rbg"))
  model = models.create_model(
    config.model, meta.num_classes, meta.input_shape, meta.mean, meta.std, rngs
  )
  tx = _cached_optimizer(
    config.optimizer, config.learning_rate, models.layer_axes_of(config.model)
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  nnx.update(model, jax.device_put(nnx.state(model), replicated))
  nnx.update(optimizer, jax.device_put(nnx.state(optimizer), replicated))
  train_step = _make_train_step(config.optimizer in NEEDS_GRAD_FN)

  def test_accuracy() -> float:
    acc = robustness.accuracy(model, test_images, test_labels)
    model.train()  # Defensive: training mode for the next steps.
    return float(acc)

  steps_per_epoch = len(train["label"]) // config.batch_size
  if not steps_per_epoch:
    raise ValueError(
      f"batch_size={config.batch_size} is larger than the "
      f"{len(train['label'])} training examples of {config.dataset!r}."
    )
  total_steps = config.epochs * steps_per_epoch
  if config.max_steps is not None:
    total_steps = min(total_steps, config.max_steps)

  results: dict[str, Any] = {
    "config": dataclasses.asdict(config),
    "devices": {"data": num_devices, "processes": jax.process_count()},
    "history": [],
    "curve": [],
  }
  step, epoch_losses = 0, []
  checkpoint_dir = workdir / CHECKPOINT_DIR
  if not config.resume:
    if is_main and checkpoint_dir.exists():
      shutil.rmtree(checkpoint_dir)
    # Every process waits here, whatever it saw: none may create the folder
    # (the manager below does) before process 0 has deleted it.
    ocp.multihost.sync_global_processes("train_and_evaluate:delete_checkpoints")
  manager = ocp.CheckpointManager(
    checkpoint_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2)
  )

  def write() -> None:
    if is_main:
      with open(workdir / "metrics.json", "w") as f:
        json.dump(results, f, indent=2)

  def save(losses: list) -> None:
    if config.checkpoints:
      progress = {
        "step": step,
        # float32 -> float -> float32 is exact, so is the epoch's mean loss.
        "epoch_losses": [float(x) for x in jax.device_get(losses)],
        # Copies: orbax writes in the background, and the run appends to
        # these lists meanwhile (the entry of an epoch cut short, say).
        "history": list(results["history"]),
        "curve": list(results["curve"]),
        "config": results["config"],
      }
      _save(manager, model, optimizer, progress)

  try:
    restored = _restore(manager, model, optimizer, config) if config.resume else None
    if restored is not None:
      step, epoch_losses = restored["step"], restored["epoch_losses"]
      results["history"], results["curve"] = restored["history"], restored["curve"]
    bar = tqdm.tqdm(
      total=total_steps,
      initial=min(step, total_steps),
      desc=f"{config.optimizer} seed {config.seed}",
      disable=not config.progress or not is_main,
      leave=False,
    )
    model.train()
    for epoch in range(step // steps_per_epoch, config.epochs):
      if step >= total_steps:
        break
      # Resuming inside an epoch: its losses so far, and the batches to skip.
      skip = step - epoch * steps_per_epoch
      losses = [np.float32(x) for x in epoch_losses] if skip else []
      batches = input_pipeline.iterate(
        train, config.batch_size, seed=config.seed, epoch=epoch
      )
      manager.wait_until_finished()  # Keeps the last epoch's save off the clock.
      start = time.perf_counter()
      eval_time = 0.0
      for batch in itertools.islice(batches, skip, skip + total_steps - step):
        batch = _shard(batch, data_sharding)
        losses.append(train_step(model, optimizer, batch["image"], batch["label"]))
        step += 1
        bar.update(1)
        if config.eval_every and step % config.eval_every == 0:
          eval_start = time.perf_counter()
          results["curve"].append({"step": step, "test_accuracy": test_accuracy()})
          eval_time += time.perf_counter() - eval_start
        # The end of an epoch is saved below, with its history entry.
        every = config.checkpoint_every
        if every and step % every == 0 and step % steps_per_epoch:
          save(losses)
      finished = step == (epoch + 1) * steps_per_epoch
      if not finished:  # Stopped by max_steps: save before the partial entry.
        save(losses)
      train_loss = float(np.mean(jax.device_get(losses)))  # Waits for the steps.
      elapsed = time.perf_counter() - start - eval_time
      steps_run = step - epoch * steps_per_epoch - skip
      acc = test_accuracy()
      if not results["curve"] or results["curve"][-1]["step"] != step:
        results["curve"].append({"step": step, "test_accuracy": acc})
      entry = {
        "epoch": epoch + 1,
        "step": step,
        "train_loss": train_loss,
        "test_accuracy": acc,
        "images_per_s": steps_run * config.batch_size / elapsed,
        "layer_stats": _to_json(optax_lgm.layer_stats(optimizer.opt_state)),
      }
      results["history"].append(entry)
      bar.set_postfix(loss=f"{train_loss:.3f}", acc=f"{acc:.3f}")
      if finished:
        save([])
      write()
    bar.close()
  finally:
    manager.close()  # Waits for the checkpoints being written.

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
  parser.add_argument(
    "--max_steps",
    type=int,
    default=None,
    help="stop after this many steps in all, with a checkpoint (default: all epochs)",
  )
  parser.add_argument(
    "--no_checkpoints", action="store_true", help="write no checkpoints"
  )
  parser.add_argument(
    "--checkpoint_every",
    type=int,
    default=defaults.checkpoint_every,
    help="steps between checkpoints, which are also written at the end of each "
    f"epoch and at --max_steps; 0: only there (default: {defaults.checkpoint_every})",
  )
  parser.add_argument(
    "--resume",
    action="store_true",
    help="go on from the latest checkpoint in WORKDIR/checkpoints; without it, "
    "that folder is deleted",
  )
  parser.add_argument(
    "--mesh",
    default=defaults.mesh,
    help="data-parallel devices: 'auto' (all) or 'data=N' (the first N); "
    f"batch_size must be a multiple of N (default: {defaults.mesh})",
  )
  parser.add_argument(
    "--distributed",
    action="store_true",
    help="call jax.distributed.initialize() first (one process per host)",
  )
  parser.add_argument(
    "--coordinator_address",
    default=None,
    help="with --distributed: HOST:PORT of process 0 (default: found by JAX on "
    "SLURM, Open MPI, Kubernetes, Cloud TPU, or $JAX_COORDINATOR_ADDRESS)",
  )
  parser.add_argument(
    "--num_processes", type=int, default=None, help="with --distributed"
  )
  parser.add_argument(
    "--process_id", type=int, default=None, help="with --distributed: 0, 1, ..."
  )
  parser.add_argument("--workdir", default=None, help="default: workdir/OPTIMIZER")
  args = parser.parse_args(argv)
  cluster = (args.coordinator_address, args.num_processes, args.process_id)
  if args.distributed:
    jax.distributed.initialize(*cluster)
  elif any(value is not None for value in cluster):
    parser.error(
      "--coordinator_address, --num_processes and --process_id need --distributed"
    )
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
    max_steps=args.max_steps,
    checkpoints=not args.no_checkpoints,
    checkpoint_every=args.checkpoint_every,
    resume=args.resume,
    mesh=args.mesh,
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
