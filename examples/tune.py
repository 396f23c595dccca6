"""Each optimizer at its own learning rate: the tuning of ``compare --tune``.

Every run (seed 0) is judged by its final accuracy on the validation split
(``Config.validation``), never on the test set. The learning rates form a log
grid around the optimizer's default (`powers`), widened by one rate beyond an
edge while the best rate is there; ``sam`` and ``layer_sam`` then try each
radius at that rate. Of runs that tie, the one nearest the default wins.
"""

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any

from examples.config import Config
from examples.optimizers import DEFAULT_LEARNING_RATES, DEFAULT_RHOS

RHO_FACTORS = (0.4, 1.0, 2.0)
"""The radii tried for ``sam`` and ``layer_sam`` at their chosen rate, as
multiples of the optimizer's default radius (``DEFAULT_RHOS``)."""


def powers(points: int) -> list[int]:
  """``points`` consecutive powers of the grid's factor, 0 (the default) inside."""
  if points < 2:
    raise ValueError(f"points={points} must be at least 2")
  return list(range(-(points // 2), points - points // 2))


def tune(
  config: Config, name: str, train: Callable[[Config], dict[str, Any]], *,
  points: int = 4, factor: float = 3.0, max_widen: int = 3,
) -> dict[str, Any]:  # fmt: skip
  """Tunes optimizer ``name``'s learning rate (and radius) on the validation split.

  ``train`` runs one training of a `Config` and returns its results; the first
  grid has ``points`` rates, ``factor`` apart, and may widen ``max_widen`` times.
  Returns ``grid`` (per run: ``learning_rate``, ``power``, ``rho``,
  ``validation_accuracy``, ``seconds``), ``rho_grid`` (the same, for the radii),
  ``chosen`` (``learning_rate`` and ``rho``), ``widened`` (the rates added beyond
  an edge, in turn) and ``inside`` (whether the chosen rate lies strictly inside
  the grid that ran).
  """
  if not config.validation:
    raise ValueError("tuning needs a validation split: set Config.validation")
  if factor <= 1:
    raise ValueError(f"factor={factor} must be above 1")
  default, default_rho = DEFAULT_LEARNING_RATES[name], DEFAULT_RHOS.get(name)

  @functools.cache  # A rate and radius tried before are not run again.
  def trial(power: int, rho: float | None) -> dict[str, Any]:
    lr = default * factor**power
    run = dataclasses.replace(
      config, optimizer=name, learning_rate=lr, rho=rho, seed=0,
      evaluate_on="validation", eval_every=0, robustness=False,
    )  # fmt: skip
    start = time.perf_counter()
    accuracy = train(run)["final_validation_accuracy"]
    return {
      "learning_rate": lr, "power": power, "rho": rho,
      "validation_accuracy": accuracy, "seconds": time.perf_counter() - start,
    }  # fmt: skip

  def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return max(runs, key=lambda r: (r["validation_accuracy"], -abs(r["power"])))

  grid = [trial(p, default_rho) for p in powers(points)]
  chosen, widened = best(grid), []
  while chosen in (grid[0], grid[-1]) and len(widened) < max_widen:
    edge = grid[0]["power"] - 1 if chosen is grid[0] else grid[-1]["power"] + 1
    grid = sorted([*grid, trial(edge, default_rho)], key=lambda r: r["power"])
    chosen = best(grid)
    widened.append(default * factor**edge)
  inside = chosen not in (grid[0], grid[-1])
  rhos = [round(default_rho * f, 12) for f in RHO_FACTORS] if default_rho else []
  rho_grid = [trial(chosen["power"], rho) for rho in rhos]
  if rho_grid:  # Of radii that tie, the default.
    chosen = max(
      rho_grid, key=lambda r: (r["validation_accuracy"], r["rho"] == default_rho)
    )
  return {
    "grid": grid,
    "rho_grid": rho_grid,
    "chosen": {"learning_rate": chosen["learning_rate"], "rho": chosen["rho"]},
    "widened": widened,
    "inside": inside,
  }


def seconds_of(tuning: dict[str, dict[str, Any]]) -> float:
  """The training-run seconds the tuning took (all its runs)."""
  runs = {id(r): r for t in tuning.values() for r in [*t["grid"], *t["rho_grid"]]}
  return math.fsum(r["seconds"] for r in runs.values())
