"""The settings of `examples.train` and `examples.compare`, and their command line.

`Parser` makes `Config` a command line with simple-parsing (``--name VALUE``,
``--name``/``--no_name`` for booleans); `check` rejects settings that cannot work.
"""

import argparse
import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any, NoReturn

import simple_parsing as sp

from examples.input_pipeline import DATASETS
from examples.models import MODELS

OPTIMIZERS = ("sgd", "adam", "lars", "sam", "lgm", "dgs", "layer_sam")
"""Names of the optimizers of `examples.optimizers.make_optimizer`."""


class UsageError(ValueError):
  """Settings that cannot work; the message says what to change."""


def field(default: Any, help_text: str, choices: Sequence[str] = ()) -> Any:
  """A setting: simple-parsing's ``--name/--no_name`` flag or field (of ``choices``)."""
  if isinstance(default, bool):
    return sp.flag(default=default, help=help_text, negative_prefix="--no_")
  return sp.field(default=default, help=help_text, choices=choices or None)


@dataclasses.dataclass
class Config:
  """Settings of one training run; the help text of each field is its flag's."""

  dataset: str = field("digits", "the dataset", choices=DATASETS)
  model: str = field("cnn", "the model", choices=MODELS)
  optimizer: str = field("sgd", "the optimizer", choices=OPTIMIZERS)
  learning_rate: float | None = field(
    None,
    "learning rate (default: the optimizer's, from DEFAULT_LEARNING_RATES in "
    "examples/optimizers.py; recorded in metrics.json)",
  )
  epochs: int = field(5, "passes over the training set")
  batch_size: int = field(64, "examples per step (per micro-batch with grad_accum)")
  grad_accum: int = field(
    1,
    "apply the mean gradient of this many batches in one update (optax.MultiSteps); "
    "sam and layer_sam perturb each batch at its own gradient",
  )
  dtype: str = field(
    "float32",
    "computation dtype; parameters and optimizer states stay float32",
    choices=("float32", "bfloat16"),
  )
  seed: int = field(0, "seed of the initialisation, the data order and the attacks")
  data_dir: str | None = field(None, "the TFDS data dir (default: TFDS's)")
  validation: int = field(
    0,
    "hold out this many training examples (the same draw in every run) as a "
    "validation split, for tuning; training uses the rest (0: none)",
  )
  evaluate_on: str = field(
    "test",
    "the split of every evaluation, the time to target and the final accuracy: "
    "'test', or 'validation' (needs --validation; metrics.json's test_accuracy "
    "entries then hold validation accuracies, and evaluated_on says so)",
    choices=("test", "validation"),
  )
  eval_every: int = field(
    0, "also evaluate test accuracy every this many steps (0: once per epoch)"
  )
  target_accuracy: float = field(
    0.95,
    "record time_to_target: training seconds (compilation in, evaluation out) "
    "until the first evaluation at or above this test accuracy",
  )
  layer_sam_mode: str = field(
    "static",
    "layer_sam's selection: 'static' (optax_lgm.StaticSelection: fixed between "
    "re-selections, the fast path) or 'dynamic' (chosen in the graph every step)",
    choices=("static", "dynamic"),
  )
  rho: float | None = field(
    None,
    "sam and layer_sam: the radius of the perturbation (default: the "
    "optimizer's, from DEFAULT_RHOS in examples/optimizers.py: sam 0.05, "
    "layer_sam 0.01, whose radius falls on its k layers alone; recorded in "
    "metrics.json)",
  )
  reselect_every: int = field(10, "static layer_sam: steps between re-selections")
  sam_schedule: str = field(
    "every",
    "sam and layer_sam: which steps run the second pass: 'every' (every sam_every "
    "steps), 'random' (with probability sam_probability) or 'adaptive' (AE-SAM: "
    "when the squared gradient norm is high against its running mean, the "
    "threshold rising from -1 to 1 standard deviations over the run)",
    choices=("every", "random", "adaptive"),
  )
  sam_every: int = field(
    1,
    "sam_schedule=every: run the second pass every this many steps (1: every "
    "step). Decided on the host (--sam_dispatch), it counts trainer steps, those "
    "skipped as non-finite with --skip_nonfinite included; in the graph (lax.cond: "
    "static layer_sam, or --sam_dispatch graph) it counts finite steps only, so "
    "the two differ after a skipped step",
  )
  sam_probability: float = field(
    0.5, "sam_schedule=random: the probability that a step runs the second pass"
  )
  sam_dispatch: str = field(
    "auto",
    "sam_schedule=every with sam_every > 1: decide each step's second pass on the "
    "'host' (two programs; XLA:CPU runs convolutions under lax.cond far slower) or "
    "in the 'graph' (lax.cond, one program); 'auto': host, but graph for static "
    "layer_sam (each of its selections would need two programs)",
    choices=("auto", "host", "graph"),
  )
  sam_skipped: str = field(
    "plain",
    "sam and layer_sam, steps without the second pass: 'plain' (the gradient) or "
    "'orthogonal' (LookSAM: add the stored component of the last SAM gradient "
    "orthogonal to its gradient)",
    choices=("plain", "orthogonal"),
  )
  layer_sam_start: str = field(
    "output",
    "static layer_sam's first selection: 'output' (the two layers nearest the "
    "output, a step costing about SGD's) or 'dynamic' (step 0 in dynamic mode)",
    choices=("output", "dynamic"),
  )
  layer_sam_compile: str = field(
    "background",
    "static layer_sam: compile new selections in a 'background' thread while the "
    "current one trains, or in the 'foreground' (then every decision depends on "
    "the optimizer state alone, with --layer_sam_payoff 0)",
    choices=("background", "foreground"),
  )
  layer_sam_payoff: float = field(
    4.0,
    "static layer_sam: compile a new selection only if the steps left take this "
    "many times its expected compile time on the critical path (0: always)",
  )
  compilation_cache: str = field(
    "~/.cache/optax_lgm/jax",
    "JAX's persistent compilation cache, so that reruns and resumes load their "
    "programs instead of compiling them ('': off)",
  )
  skip_nonfinite: int = field(
    0,
    "skip steps whose gradient is not finite (optax.apply_if_finite) and stop after "
    "this many in a row (0: off)",
  )
  robustness: bool = field(True, "evaluate FGSM, PGD and noise accuracy at the end")
  eps_list: tuple[float, ...] = field(
    (8 / 255, 0.1),
    "L-infinity sizes of FGSM and PGD, on the pixel scale (default: 8/255 0.1)",
  )
  sigmas: tuple[float, ...] = field(
    (0.04, 0.06, 0.08, 0.09, 0.10), "Gaussian noise levels, on the pixel scale"
  )
  pgd_steps: int = field(5, "steps of PGD")
  robustness_examples: int | None = field(
    None, "evaluate robustness on the first N test images (default: all of them)"
  )
  progress: bool = field(True, "show a progress bar")
  max_steps: int | None = field(
    None, "stop after this many steps in all, with a checkpoint (default: all epochs)"
  )
  checkpoints: bool = field(True, "write orbax checkpoints under WORKDIR/checkpoints")
  checkpoint_every: int = field(
    500, "also checkpoint every this many steps (0: at epoch ends and max_steps only)"
  )
  resume: bool = field(
    False, "go on from the latest checkpoint of WORKDIR (without: delete old ones)"
  )
  mesh: str = field(
    "auto", "data-parallel devices: 'auto' (all) or 'data=N' (the first N)"
  )


RESUME_KEYS = tuple("""dataset model optimizer learning_rate rho validation batch_size
  grad_accum dtype seed layer_sam_mode reselect_every layer_sam_start skip_nonfinite
  sam_schedule sam_every sam_probability sam_skipped""".split())  # fmt: skip
"""Settings that a resumed run must share with the run of its checkpoint."""


def static_layer_sam(config: Config) -> bool:
  """Whether ``config`` trains ``layer_sam`` through `optax_lgm.StaticSelection`."""
  return config.optimizer == "layer_sam" and config.layer_sam_mode == "static"


def check(config: Config) -> None:
  """Raises `UsageError` if ``config`` cannot work (before anything is built)."""
  for field in dataclasses.fields(Config):
    value = getattr(config, field.name)
    choices = field.metadata["custom_args"].get("choices", ())
    if choices and value not in choices:
      raise UsageError(
        f"unknown {field.name}={value!r}; choose one of {', '.join(choices)}"
      )
  if config.learning_rate is not None and not config.learning_rate > 0:
    raise UsageError(
      f"learning_rate={config.learning_rate} must be positive (or left out for "
      "the optimizer's default)"
    )
  at_least_1 = ("epochs", "batch_size", "grad_accum", "reselect_every", "sam_every")
  for name in (*at_least_1, "max_steps", "robustness_examples"):
    if getattr(config, name) is not None and getattr(config, name) < 1:
      raise UsageError(f"{name}={getattr(config, name)} must be at least 1")
  at_least_0 = ("eval_every", "checkpoint_every", "skip_nonfinite", "pgd_steps")
  for name in (*at_least_0, "validation", "layer_sam_payoff"):
    if getattr(config, name) < 0:
      raise UsageError(f"{name}={getattr(config, name)} must be 0 or more")
  if config.sam_dispatch == "host" and static_layer_sam(config):
    raise UsageError(
      "sam_dispatch=host does not combine with static layer_sam (each selection "
      "would need two programs): use --sam_dispatch graph or --layer_sam_mode "
      "dynamic"
    )
  if config.rho is not None and not config.rho > 0:
    raise UsageError(f"rho={config.rho} must be positive (or left out for the default)")
  if config.evaluate_on == "validation" and not config.validation:
    raise UsageError(
      "evaluate_on=validation needs a validation split: add --validation N"
    )
  if not 0 <= config.sam_probability <= 1:
    raise UsageError(f"sam_probability={config.sam_probability} must lie in [0, 1]")


def steps(config: Config, num_examples: int) -> tuple[int, int]:
  """The steps per epoch and in all, for a training split of ``num_examples``."""
  per_epoch = num_examples // config.batch_size
  if not per_epoch:
    raise UsageError(
      f"batch_size={config.batch_size} exceeds the {num_examples} training "
      f"examples of {config.dataset!r}"
    )
  return per_epoch, int(min(config.epochs * per_epoch, config.max_steps or math.inf))


def host_schedule(config: Config) -> int:
  """``sam_every`` where the host decides SAM's second pass (see its help), else 0."""
  every = config.optimizer in ("sam", "layer_sam") and config.sam_schedule == "every"
  on_host = config.sam_dispatch != "graph" and not static_layer_sam(config)
  return config.sam_every if every and on_host and config.sam_every > 1 else 0


class _HelpFormatter(sp.SimpleHelpFormatter):
  """simple-parsing's help, without a second default where the text states one."""

  def _get_help_string(self, action: argparse.Action) -> str | None:
    if "(default:" in (action.help or ""):
      return action.help
    return super()._get_help_string(action)


class Parser(sp.ArgumentParser):
  """One flag per `Config` field, starting from ``defaults``; errors in one line."""

  def __init__(self, description: str, defaults: Config | None = None, **kwargs):
    super().__init__(description=description, formatter_class=_HelpFormatter, **kwargs)
    self.add_arguments(Config, dest="config", default=defaults or Config())
    # TFDS warns on every run that OpenCV is missing (PIL decodes the images).
    logging.getLogger("absl").addFilter(lambda r: "OpenCV" not in r.getMessage())

  def error(self, message: str) -> NoReturn:
    """Exits with status 2 and one line (no usage block)."""
    self.exit(2, f"{self.prog}: error: {message}\n")


def parse(argv: Sequence[str] | None = None, **parser_kwargs) -> argparse.Namespace:
  """The trainer's command line: ``config``, ``workdir``, ``distributed``, ``cluster``.

  ``config.learning_rate`` and ``config.rho`` are those the run uses
  (`with_defaults`).
  """
  parser = Parser("Trains an image classifier with one optimizer.", **parser_kwargs)
  parser.add_argument(
    "--workdir", metavar="DIR", help="output directory (default: workdir/OPTIMIZER)"
  )
  group = parser.add_argument_group("several hosts")
  group.add_argument(
    "--distributed", action="store_true",
    help="call jax.distributed.initialize() first (one process per host)",
  )  # fmt: skip
  for name, kind, what in (
    ("coordinator_address", str, "HOST:PORT of process 0"),
    ("num_processes", int, "how many processes"),
    ("process_id", int, "this process's index"),
  ):
    group.add_argument(
      f"--{name}", type=kind, help=f"with --distributed: {what} (default: found by JAX)"
    )
  args = parser.parse_args(argv)
  args.cluster = (args.coordinator_address, args.num_processes, args.process_id)
  if not args.distributed and any(value is not None for value in args.cluster):
    parser.error(
      "--coordinator_address, --num_processes and --process_id need --distributed"
    )
  args.config = with_defaults(args.config)
  args.workdir = args.workdir or f"workdir/{args.config.optimizer}"
  return args


def with_defaults(config: Config) -> Config:
  """``config`` with the optimizer's defaults (if any) for a None learning_rate, rho."""
  from examples import optimizers  # noqa: PLC0415 A cycle.

  if config.learning_rate is None:
    rate = optimizers.DEFAULT_LEARNING_RATES[config.optimizer]
    config = dataclasses.replace(config, learning_rate=rate)
  if config.rho is None:
    rho = optimizers.DEFAULT_RHOS.get(config.optimizer)
    config = dataclasses.replace(config, rho=rho)
  return config
