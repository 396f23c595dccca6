"""The settings of `examples.train`, defined once, and its command line.

`Config` lists every setting with its default and its help text; `parse` builds
the ``argparse`` command line from those fields (``--name VALUE`` for each,
``--name`` and ``--no_name`` for booleans), so a new setting is one new field.
`check` rejects settings that cannot work, with a `UsageError` saying what is
wrong and how to fix it; the command line prints it in one line and exits with
status 2.
"""

import argparse
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Sequence

from examples.input_pipeline import DATASETS
from examples.models import MODELS

OPTIMIZERS = ("sgd", "adam", "lars", "sam", "lgm", "dgs", "layer_sam")
"""Names of the optimizers of `examples.train.make_optimizer`."""


SAM_SCHEDULES = ("every", "random", "adaptive")
"""Perturbation schedules of ``sam`` and ``layer_sam`` (``layer_sam(schedule=)``)."""

SAM_SKIPPED = ("plain", "orthogonal")
"""What ``sam`` and ``layer_sam`` hand on at steps without the second pass."""

DTYPES = ("float32", "bfloat16")
"""Computation dtypes; parameters and optimizer states stay float32."""


class UsageError(ValueError):
  """Settings that cannot work; the message says what to change."""


def _field(default, help_text: str, **kwargs):
  return dataclasses.field(default=default, metadata={"help": help_text, **kwargs})


@dataclasses.dataclass
class Config:
  """Settings of one training run; the help text of each field is its flag's."""

  dataset: str = _field("digits", "the dataset", choices=DATASETS)
  model: str = _field("cnn", "the model", choices=MODELS)
  optimizer: str = _field("sgd", "the optimizer", choices=OPTIMIZERS)
  learning_rate: float | None = _field(
    None,
    "learning rate (default: the optimizer's, from DEFAULT_LEARNING_RATES in "
    "examples/optimizers.py; recorded in metrics.json)",
  )
  epochs: int = _field(5, "passes over the training set")
  batch_size: int = _field(64, "examples per step (per micro-batch with grad_accum)")
  grad_accum: int = _field(
    1,
    "apply the mean gradient of this many batches in one update (optax.MultiSteps); "
    "sam and layer_sam perturb each batch at its own gradient",
  )
  dtype: str = _field(
    "float32",
    "computation dtype; parameters and optimizer states stay float32",
    choices=DTYPES,
  )
  seed: int = _field(0, "seed of the initialisation, the data order and the attacks")
  data_dir: str | None = _field(None, "the TFDS data dir (default: TFDS's)")
  eval_every: int = _field(
    0, "also evaluate test accuracy every this many steps (0: once per epoch)"
  )
  target_accuracy: float = _field(
    0.95,
    "record time_to_target: training seconds (compilation in, evaluation out) "
    "until the first evaluation at or above this test accuracy",
  )
  layer_sam_mode: str = _field(
    "static",
    "layer_sam's selection: 'static' (optax_lgm.StaticSelection: fixed between "
    "re-selections, the fast path) or 'dynamic' (chosen in the graph every step)",
    choices=("static", "dynamic"),
  )
  reselect_every: int = _field(10, "static layer_sam: steps between re-selections")
  sam_schedule: str = _field(
    "every",
    "sam and layer_sam: which steps run the second pass: 'every' (every sam_every "
    "steps), 'random' (with probability sam_probability) or 'adaptive' (AE-SAM: "
    "when the squared gradient norm is high against its running mean, the "
    "threshold rising from -1 to 1 standard deviations over the run)",
    choices=SAM_SCHEDULES,
  )
  sam_every: int = _field(
    1, "sam_schedule=every: run the second pass every this many steps (1: every step)"
  )
  sam_probability: float = _field(
    0.5, "sam_schedule=random: the probability that a step runs the second pass"
  )
  sam_skipped: str = _field(
    "plain",
    "sam and layer_sam, steps without the second pass: 'plain' (the gradient) or "
    "'orthogonal' (LookSAM: add the stored component of the last SAM gradient "
    "orthogonal to its gradient)",
    choices=SAM_SKIPPED,
  )
  layer_sam_start: str = _field(
    "output",
    "static layer_sam's first selection: 'output' (the model's two layers nearest "
    "the output, a step that costs about SGD's) or 'dynamic' (step 0 in dynamic "
    "mode)",
    choices=("output", "dynamic"),
  )
  layer_sam_compile: str = _field(
    "background",
    "static layer_sam: compile new selections in a 'background' thread while the "
    "current one trains, or in the 'foreground' (then every decision depends on "
    "the optimizer state alone, with --layer_sam_payoff 0)",
    choices=("background", "foreground"),
  )
  layer_sam_payoff: float = _field(
    4.0,
    "static layer_sam: compile a new selection only if the steps left take this "
    "many times its expected compile time on the critical path (0: always)",
  )
  compilation_cache: str = _field(
    "~/.cache/optax_lgm/jax",
    "JAX's persistent compilation cache, so that reruns and resumes load their "
    "programs instead of compiling them ('': off)",
  )
  skip_nonfinite: int = _field(
    0,
    "skip steps whose gradient is not finite (optax.apply_if_finite) and stop after "
    "this many in a row (0: off)",
  )
  robustness: bool = _field(True, "evaluate FGSM, PGD and noise accuracy at the end")
  eps_list: tuple[float, ...] = _field(
    (8 / 255, 0.1), "L-infinity sizes of FGSM and PGD, on the pixel scale"
  )
  sigmas: tuple[float, ...] = _field(
    (0.04, 0.06, 0.08, 0.09, 0.10), "Gaussian noise levels, on the pixel scale"
  )
  pgd_steps: int = _field(5, "steps of PGD")
  robustness_examples: int | None = _field(
    None, "evaluate robustness on the first N test images (default: all of them)"
  )
  progress: bool = _field(True, "show a progress bar")
  max_steps: int | None = _field(
    None, "stop after this many steps in all, with a checkpoint (default: all epochs)"
  )
  checkpoints: bool = _field(True, "write orbax checkpoints under WORKDIR/checkpoints")
  checkpoint_every: int = _field(
    500, "also checkpoint every this many steps (0: at epoch ends and max_steps only)"
  )
  resume: bool = _field(
    False,
    "go on from the latest checkpoint of WORKDIR (without it, old checkpoints are "
    "deleted)",
  )
  mesh: str = _field(
    "auto", "data-parallel devices: 'auto' (all) or 'data=N' (the first N)"
  )


RESUME_KEYS = (
  "dataset",
  "model",
  "optimizer",
  "learning_rate",
  "batch_size",
  "grad_accum",
  "dtype",
  "seed",
  "layer_sam_mode",
  "reselect_every",
  "layer_sam_start",
  "skip_nonfinite",
  "sam_schedule",
  "sam_every",
  "sam_probability",
  "sam_skipped",
)
"""Settings that a resumed run must share with the run of its checkpoint."""


def check(config: Config) -> None:
  """Raises `UsageError` if ``config`` cannot work (before anything is built)."""
  for name in (
    "dataset",
    "model",
    "optimizer",
    "dtype",
    "layer_sam_mode",
    "layer_sam_start",
    "layer_sam_compile",
    "sam_schedule",
    "sam_skipped",
  ):
    choices = next(f for f in dataclasses.fields(Config) if f.name == name)
    choices = choices.metadata["choices"]
    if getattr(config, name) not in choices:
      raise UsageError(
        f"unknown {name}={getattr(config, name)!r}; choose one of {', '.join(choices)}"
      )
  if config.learning_rate is not None and not config.learning_rate > 0:
    raise UsageError(
      f"learning_rate={config.learning_rate} must be positive (or left out for "
      "the optimizer's default)"
    )
  for name in ("epochs", "batch_size", "grad_accum", "reselect_every", "sam_every"):
    if getattr(config, name) < 1:
      raise UsageError(f"{name}={getattr(config, name)} must be at least 1")
  for name in (
    "eval_every",
    "checkpoint_every",
    "skip_nonfinite",
    "pgd_steps",
    "layer_sam_payoff",
  ):
    if getattr(config, name) < 0:
      raise UsageError(f"{name}={getattr(config, name)} must be 0 or more")
  if not 0 <= config.sam_probability <= 1:
    raise UsageError(f"sam_probability={config.sam_probability} must lie in [0, 1]")
  if config.max_steps is not None and config.max_steps < 1:
    raise UsageError(f"max_steps={config.max_steps} must be at least 1")
  if config.robustness_examples is not None and config.robustness_examples < 1:
    raise UsageError(
      f"robustness_examples={config.robustness_examples} must be at least 1"
    )


def quiet() -> None:
  """Silences TFDS's warning, on every run, that OpenCV is missing (PIL decodes)."""
  logging.getLogger("absl").addFilter(lambda r: "OpenCV" not in r.getMessage())


def _argument_type(hint):
  """The ``argparse`` type of a field: its type, without ``None``."""
  if typing.get_origin(hint) not in (typing.Union, types.UnionType):
    return hint
  (kind,) = [a for a in typing.get_args(hint) if a is not type(None)]
  return kind


def _help(help_text: str, default) -> str:
  """``help_text`` with its default, unless the text already says it."""
  if "(default:" in help_text:
    return help_text
  if isinstance(default, tuple):
    default = " ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in default)
  return f"{help_text} (default: {default})"


def parse(
  argv: Sequence[str] | None = None, description: str = "", **parser_kwargs
) -> argparse.Namespace:
  """Parses the command line: one flag per `Config` field, plus the others.

  Args:
    argv: the arguments (default: ``sys.argv[1:]``).
    description: what the program does, for ``--help``.
    **parser_kwargs: passed to ``argparse.ArgumentParser``.

  Returns:
    A namespace with ``config`` (a `Config`), ``workdir``, and the
    ``distributed`` settings. A bad value exits with status 2 and one line.
  """
  # The defaults are written into each help text by `_help` (argparse's
  # ArgumentDefaultsHelpFormatter repeats those a text states, and gives
  # --no_name the default of --name).
  parser = argparse.ArgumentParser(description=description, **parser_kwargs)
  quiet()

  def error(message: str) -> typing.NoReturn:  # One line, no usage block.
    parser.exit(2, f"{parser.prog}: error: {message}\n")

  parser.error = error
  hints = typing.get_type_hints(Config)
  for field in dataclasses.fields(Config):
    kind = _argument_type(hints[field.name])
    flag, help_text = f"--{field.name}", field.metadata["help"]
    if kind is bool:  # --name and --no_name.
      off = f"on; --no_{field.name} turns it off" if field.default else "off"
      group = parser.add_mutually_exclusive_group()
      group.add_argument(
        flag, action="store_true", default=field.default,
        help=f"{help_text} (default: {off})",
      )  # fmt: skip
      group.add_argument(
        f"--no_{field.name}", dest=field.name, action="store_false",
        help=argparse.SUPPRESS,
      )  # fmt: skip
    elif typing.get_origin(kind) is tuple:
      item = typing.get_args(kind)[0]
      parser.add_argument(
        flag,
        default=field.default,
        type=item,
        nargs="+",
        help=_help(help_text, field.default),
      )
    else:
      choices = field.metadata.get("choices")
      if choices:
        help_text = f"{help_text}, one of: {', '.join(choices)}"
      parser.add_argument(
        flag,
        default=field.default,
        type=kind,
        help=_help(help_text, field.default),
        choices=choices,
        metavar=field.name.upper() if choices else None,
      )
  parser.add_argument(
    "--workdir", default=None, help="output directory (default: workdir/OPTIMIZER)"
  )
  group = parser.add_argument_group("several hosts")
  group.add_argument(
    "--distributed",
    action="store_true",
    help="call jax.distributed.initialize() first (one process per host; default: off)",
  )
  group.add_argument(
    "--coordinator_address",
    default=None,
    help="with --distributed: HOST:PORT of process 0 (default: found by JAX)",
  )
  group.add_argument(
    "--num_processes",
    type=int,
    default=None,
    help="with --distributed: how many processes (default: found by JAX)",
  )
  group.add_argument(
    "--process_id",
    type=int,
    default=None,
    help="with --distributed: this process's index (default: found by JAX)",
  )
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  names = [f.name for f in dataclasses.fields(Config)]
  values = {name: getattr(args, name) for name in names}
  for name in ("eps_list", "sigmas"):
    values[name] = tuple(values[name])
  if values["learning_rate"] is None:  # Recorded as the rate the run uses.
    from examples.optimizers import DEFAULT_LEARNING_RATES  # noqa: PLC0415 A cycle.

    values["learning_rate"] = DEFAULT_LEARNING_RATES[values["optimizer"]]
  cluster = (args.coordinator_address, args.num_processes, args.process_id)
  if not args.distributed and any(value is not None for value in cluster):
    error("--coordinator_address, --num_processes and --process_id need --distributed")
  return argparse.Namespace(
    config=Config(**values),
    workdir=args.workdir or f"workdir/{values['optimizer']}",
    distributed=args.distributed,
    cluster=cluster,
  )
