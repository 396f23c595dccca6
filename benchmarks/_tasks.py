"""What the benchmarks share: the digits data, models as pure losses, their steps.

Every benchmark that trains does so through `examples.loop.run`, the example
trainer's loop, with `train_pure` (a `Task`'s pure step) or `train_nnx` (the
trainer's own `examples.train.train_step`), on `examples.input_pipeline`'s
digits indexed by step (``batch_at``). The rest: the flags, contenders, steps
and JSON output that several benchmarks have in common.
"""

import argparse
import functools
import json
import os
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import _timing
from examples import input_pipeline, loop, models, robustness, train

SHARE_FORWARD = {"xla_disable_hlo_passes": "reshape-mover"}
"""XLA options that let SAM's two forward passes share the layers below the
lowest perturbed one (see `examples.distributed.share_forward_passes`)."""


@functools.cache
def digits(size: int = 8) -> tuple[dict, dict, input_pipeline.DatasetMetadata]:
  """The digits of `examples.input_pipeline`: train and test splits, metadata.

  ``size=32`` upscales the 8x8 images 4x and repeats them over 3 channels, the
  shape of CIFAR (for the ResNets).
  """
  train_source, test_source, meta = input_pipeline.get_datasets("digits")
  splits = [input_pipeline.load_split(s) for s in (train_source, test_source)]
  if size == 32:
    for split in splits:
      x = np.kron(split["image"][..., 0], np.ones((1, 4, 4), np.float32))
      split["image"] = np.repeat(x[..., None], 3, axis=-1)
  return splits[0], splits[1], meta


class Task:
  """A model split into a pure loss over (params, batch statistics).

  ``model`` (a name of `examples.models` or its ``create_model``'s signature)
  is initialised from ``seed``, with the input statistics of the images ``x``.
  """

  def __init__(self, x: np.ndarray, seed: int = 0, model: Any = "resnet20"):
    mean = tuple(float(m) for m in x.mean(axis=(0, 1, 2)))
    std = tuple(float(s) + 1e-3 for s in x.std(axis=(0, 1, 2)))
    if isinstance(model, str):
      model = functools.partial(models.create_model, model)
    model = model(10, x.shape[1:], mean, std, rngs=nnx.Rngs(seed))
    self.graphdef, *states = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    self.params, self.stats, self.rest = map(nnx.as_pure, states)

  def loss(self, params, stats, x, y):
    """Cross-entropy and the updated batch statistics."""
    model = nnx.merge(self.graphdef, params, stats, self.rest)
    logits = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, nnx.as_pure(nnx.state(model, nnx.BatchStat))

  def grad_fn(self, stats, x, y) -> Callable:
    """The second-pass gradient (params, i) -> grads; statistics discarded."""
    return jax.grad(lambda p, _: self.loss(p, stats, x, y)[0])

  @functools.partial(jax.jit, static_argnums=0)
  def accuracy(self, params, stats, x, y) -> jax.Array:
    """Test accuracy in inference mode."""
    model = nnx.merge(self.graphdef, params, stats, self.rest)
    model.eval()
    return jnp.mean(jnp.argmax(model(x), -1) == y)


def make_step(task: Task, tx, *, sam: bool, traces: list | None = None):
  """A training step; ``selection`` (static) is passed on when given."""

  def step(params, stats, opt_state, x, y, selection=None):
    if traces is not None:
      traces.append(selection)  # Runs once per trace (compilation).
    grad = jax.value_and_grad(task.loss, has_aux=True)
    (loss, new_stats), grads = grad(params, stats, x, y)
    extra = {"grad_fn": task.grad_fn(stats, x, y)} if sam else {}
    if selection is not None:
      extra["selection"] = selection
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  return step


def jit_step(task: Task, tx, *, sam: bool, traces: list | None = None, options=None):
  """`make_step` jitted, ``selection`` static, with the XLA compiler ``options``."""
  step = make_step(task, tx, sam=sam, traces=traces)
  return jax.jit(step, static_argnames="selection", compiler_options=options)


def compile_steps(task: Task, contenders: Mapping, params, stats, batch, **kwargs):
  """Compiles each contender's step once: `benchmarks._timing.compile_interleaved`
  (with ``kwargs``) of ``contenders``, name -> (transformation, whether it takes
  ``grad_fn``, static selection).

  Returns the compile timings and, per contender, a call of its compiled step on
  ``batch`` from ``(params, stats, tx.init(params))``.
  """
  steps = {}
  for name, (tx, sam, selection) in contenders.items():
    step = functools.partial(make_step(task, tx, sam=sam), selection=selection)
    steps[name] = (step, (params, stats, tx.init(params), *batch))
  comp = _timing.compile_interleaved(steps, reps=1, **kwargs)
  return comp, {
    name: functools.partial(c.compiled, *steps[name][1]) for name, c in comp.items()
  }


def opaque_sam(base: optax.GradientTransformation, rho: float):
  """``optax.contrib.sam`` in opaque mode around ``base``, with radius ``rho``."""
  adversary = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
  return optax.contrib.sam(base, adversary, opaque_mode=True)


def train_pure(
  task: Task, tx, step, train_split: dict, test_split: dict | None = None, *,
  steps: int, batch: int, seed: int, eval_every: int = 0, target: float = 1.0,
  stop_at_target: bool = False, after_step=lambda step, state, loss: None,
) -> tuple[tuple, loop.Metrics]:  # fmt: skip
  """Trains ``task`` with a pure ``step`` through `examples.loop.run`.

  Returns the final ``(params, stats, opt_state)`` and the run's metrics (with
  the ``final_loss``).
  """
  losses = []

  def one(state, b):
    *state, loss = step(*state, b["image"], b["label"])
    losses[:] = [loss]
    return tuple(state), loss

  def evaluate(state) -> float:
    return float(task.accuracy(*state[:2], test_split["image"], test_split["label"]))

  metrics = loop.Metrics(target)
  state = loop.run(
    one, (task.params, task.stats, tx.init(task.params)),
    lambda i: input_pipeline.batch_at(train_split, batch, seed, i),
    range(steps), metrics, evaluate=evaluate,
    eval_at=lambda i: bool(eval_every) and (i % eval_every == 0 or i == steps),
    stop_at_target=stop_at_target, after_step=after_step,
  )  # fmt: skip
  metrics.data["final_loss"] = float(losses[0]) if losses else float("nan")
  return state, metrics


def train_nnx(
  model: nnx.Module, tx, train_split: dict, test_split: dict, *, epochs: int,
  batch: int, seed: int, eval_every: int = 0, target: float = 1.0,
) -> tuple[float, int | None, bool]:  # fmt: skip
  """Trains an NNX model with the example trainer's step, through the loop.

  Evaluates every ``eval_every`` steps (0: at the end only); returns the final
  test accuracy (0 if the loss diverged), the steps to ``target`` and whether
  the loss diverged.
  """
  optimizer, losses = nnx.Optimizer(model, tx, wrt=nnx.Param), []
  steps = epochs * (len(train_split["label"]) // batch)
  eval_every = eval_every or steps

  def one(state, b):
    losses.append(train.train_step(*state, b["image"], b["label"]))
    return state, losses[-1]

  def evaluate(_) -> float:
    acc = float(robustness.accuracy(model, test_split["image"], test_split["label"]))
    model.train()
    return acc

  metrics = loop.Metrics(target)
  loop.run(
    one, (model, optimizer),
    lambda i: input_pipeline.batch_at(train_split, batch, seed, i),
    range(steps), metrics, evaluate=evaluate,
    eval_at=lambda i: i % eval_every == 0 or i == steps,
  )  # fmt: skip
  if not np.isfinite(float(losses[-1])):
    return 0.0, None, True
  data = metrics.data
  return data["curve"][-1]["test_accuracy"], data["steps_to_target"], False


def budget_mask(prefixes: str | Sequence[str]) -> Callable[[Any], Any]:
  """A ``mask`` for ``layer_sam``: only leaves under ``prefixes`` are candidates.

  A static step costs what its lowest selected layer costs: this bounds it.
  """
  prefixes = tuple(prefixes.split(",") if isinstance(prefixes, str) else prefixes)

  def under(path, _) -> bool:  # A path such as blocks/8/conv1/kernel.
    return jax.tree_util.keystr(path, simple=True, separator="/").startswith(prefixes)

  return functools.partial(jax.tree_util.tree_map_with_path, under)


def output_side(names: Sequence[str], k: int) -> tuple[list[str], tuple[int, ...]]:
  """The ``k`` layers of a ResNet's ``names`` nearest the output, and their indices."""
  within = ("conv1", "bn1", "conv2", "bn2", "projection")

  def key(name: str):  # The position from input to output.
    parts = name.split("/")
    if parts[0] in ("conv", "bn"):
      return (0, 0, parts[0] == "bn", name)
    if parts[0] == "blocks":
      sub = next((i for i, w in enumerate(within) if w == parts[2]), 9)
      return (1, int(parts[1]), sub, name)
    return (2, 0, 0, name)

  side = sorted(names, key=key)[-k:]
  return side, tuple(sorted(names.index(n) for n in side))


def record(module: str, argv: Sequence[str] | None) -> dict[str, Any]:
  """The command, commit and machine of a run of ``module``, for its JSON."""
  argv = sys.argv[1:] if argv is None else argv
  device = jax.devices()[0]
  machine = (
    f"{device.device_kind} ({jax.device_count()} device), "
    f"{os.cpu_count()} CPU cores, jax {jax.__version__}"
  )
  command = shlex.join(["python", "-m", module, *argv])
  return dict(command=command, commit=loop.commit(), machine=machine)


def write_json(path: str | None, data: Any, indent: int = 2) -> None:
  """Writes ``data`` as JSON to ``path`` (the ``--json`` flag), if one is given."""
  if path:
    with open(path, "w") as f:
      json.dump(data, f, indent=indent)


HELP = {
  "budget": "comma-separated layer-name prefixes a budgeted selection may perturb",
  "json": "write the results here",
}  # The help of the flags that several benchmarks share (`parser`).


def parser(doc: str, **flags: Any) -> argparse.ArgumentParser:
  """A benchmark's command line: ``--name`` for each keyword ``name=default``.

  The flag takes values of the default's type (``False``: a switch; ``None``: a
  string; a list: one of its strings, the first by default);
  ``name=(default, help)`` gives a help text (else `HELP`'s). Underscores in the
  name become dashes.
  """
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  for name, spec in flags.items():
    default, text = spec if isinstance(spec, tuple) else (spec, HELP.get(name))
    flag = "--" + name.replace("_", "-")
    if isinstance(default, bool):
      parser.add_argument(flag, action="store_true", help=text)
    elif isinstance(default, list):
      parser.add_argument(flag, default=default[0], choices=default, help=text)
    else:
      kind = str if default is None else type(default)
      parser.add_argument(flag, type=kind, default=default, help=text)
  return parser
