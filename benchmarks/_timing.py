"""Interleaved timing: medians and paired ratios measured in one process.

Every figure of the report is a ratio to a baseline timed in the same run.
The contenders are timed in rounds, each contender once per round (A B C, then
B C A, ...: the order rotates so that no contender always follows the same
one), and the ratio of a contender is the median over rounds of its time
divided by the baseline's time *in the same round*. A slow spell of a shared
machine then falls on both sides of most ratios and cancels.
"""

import concurrent.futures
import dataclasses
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

MIN_SAMPLE_S = 0.02
"""A sample repeats the call until it lasts this long, so the timer does not
dominate (the number of calls is calibrated once per contender)."""


@dataclasses.dataclass
class Timing:
  """The interleaved measurement of one contender.

  Attributes:
    samples: seconds per call, one per round.
    ratios: ``samples`` divided by the baseline's sample of the same round.
    calls: how many calls each sample averages.
  """

  samples: list[float]
  ratios: list[float]
  calls: int

  @property
  def median_s(self) -> float:
    return float(np.median(self.samples))

  @property
  def ratio(self) -> float:
    """Median of the paired ratios to the baseline."""
    return float(np.median(self.ratios))

  def to_json(self) -> dict[str, Any]:
    q25, q75 = np.percentile(self.ratios, [25, 75])
    return dict(
      median_s=self.median_s, ratio=self.ratio, ratio_q25=float(q25),
      ratio_q75=float(q75), calls_per_sample=self.calls, samples_s=self.samples,
    )  # fmt: skip


def rounds(names: Sequence[str], reps: int):
  """Yields, per round, the contenders in an order rotated by one each round."""
  for r in range(reps):
    k = r % len(names)
    yield list(names[k:]) + list(names[:k])


def _seconds(fn: Callable[[], Any], n: int = 1) -> float:
  """Seconds per call of ``fn`` over ``n`` calls, each blocked on."""
  t0 = time.perf_counter()
  for _ in range(n):
    jax.block_until_ready(fn())
  return (time.perf_counter() - t0) / n


def _check_baseline(baseline: str, names: Mapping[str, Any]) -> None:
  if baseline not in names:
    raise ValueError(f"baseline={baseline!r} is not one of {list(names)}.")


def interleaved(
  fns: Mapping[str, Callable[[], Any]], *, baseline: str, reps: int, warmup: int = 2,
  progress: Callable[[str], None] | None = None,
) -> dict[str, Timing]:  # fmt: skip
  """Times already-compiled contenders interleaved; returns one `Timing` each.

  Args:
    fns: contender name -> a function of no argument that runs one call.
    baseline: the name of the contender the ratios are taken against.
    reps: number of rounds (samples per contender).
    warmup: untimed calls of each contender before the first round.
    progress: called with a short message after each round.
  """
  _check_baseline(baseline, fns)
  calls = {}
  for name, fn in fns.items():
    for _ in range(warmup):
      _seconds(fn)
    calls[name] = max(1, math.ceil(MIN_SAMPLE_S / max(_seconds(fn), 1e-7)))
  samples: dict[str, list[float]] = {name: [] for name in fns}
  for i, order in enumerate(rounds(list(fns), reps)):
    for name in order:
      samples[name].append(_seconds(fns[name], calls[name]))
    if progress is not None:
      progress(f"round {i + 1}/{reps}")
  base = np.asarray(samples[baseline])
  return {
    name: Timing(s, list(np.asarray(s) / base), calls[name])
    for name, s in samples.items()
  }


@dataclasses.dataclass
class CompileTiming:
  """Interleaved compile-time measurement of one contender.

  Attributes:
    trace_lower_s: seconds to trace and lower to StableHLO, one per round.
    compile_s: seconds of XLA compilation, one per round.
    ratio: median of the total (trace + lower + compile) divided by the
      baseline's total of the same round.
    fusions: number of fused computations in the optimised HLO, and
    distinct_fusions: how many of them differ (`fusion_counts`).
    bytes_accessed: XLA's estimate of the bytes one call reads and writes.
    parallel: whether the compilations ran concurrently (then the compile
      times are indicative only).
    compiled: the last compiled executable (reused to time the calls).
  """

  trace_lower_s: list[float]
  compile_s: list[float]
  ratio: float
  fusions: int
  distinct_fusions: int
  bytes_accessed: float
  parallel: bool = False
  compiled: Any = dataclasses.field(repr=False, default=None)

  @property
  def total_s(self) -> float:
    """Median seconds of trace + lower + compile."""
    return float(np.median(np.add(self.trace_lower_s, self.compile_s)))

  def to_json(self) -> dict[str, Any]:
    return dict(
      total_s=self.total_s, trace_lower_s=self.trace_lower_s, compile_s=self.compile_s,
      ratio=self.ratio, fusions=self.fusions, distinct_fusions=self.distinct_fusions,
      bytes_accessed=self.bytes_accessed, parallel=self.parallel,
    )  # fmt: skip


def cost(compiled: Any, key: str) -> float:
  """``key`` of XLA's ``cost_analysis`` of a compiled executable (NaN if absent)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get(key, float("nan")))


def fusion_counts(hlo_text: str) -> tuple[int, int]:
  """Counts the fused computations of ``compiled.as_text()``, and the distinct.

  Two computations are the same when their bodies are equal after the
  instruction names, metadata and stack frames are removed (XLA compiles
  identical fusions once: the kernels it generates).
  """
  blocks = re.findall(
    r"\n(%[\w.\-]+) \(.*?\) -> .*? \{\n(.*?)\n\}", hlo_text, flags=re.S
  )
  fused = [body for name, body in blocks if re.search("fused|fusion|wrapped", name)]
  canon = set()
  for body in fused:
    body = re.sub(r", metadata=\{[^}]*\}", "", body)
    body = re.sub(r"stack_frame_id=\d+", "", body)
    canon.add(re.sub(r"%[\w.\-]+", "%", body))
  return len(fused), len(canon)


def compile_interleaved(
  fns: Mapping[str, tuple[Callable, tuple]], *, baseline: str, reps: int,
  workers: int = 1, options: dict[str, Any] | None = None,
  progress: Callable[[str], None] | None = None,
) -> dict[str, CompileTiming]:  # fmt: skip
  """Traces, lowers and compiles each contender ``reps`` times, interleaved.

  Args:
    fns: contender name -> ``(fn, args)``: the function and the arguments to
      lower it with (each round traces it anew).
    baseline, reps: as in `interleaved`.
    workers: with more than one, each round's XLA compilations run on that
      many threads at once (where the compile times are not the figure of
      interest; they are then marked ``parallel``).
    options: XLA compiler options of every compilation.
    progress: called with a short message after each compilation.
  """
  _check_baseline(baseline, fns)
  lower_s: dict[str, list[float]] = {name: [] for name in fns}
  comp_s: dict[str, list[float]] = {name: [] for name in fns}
  last: dict[str, Any] = {}

  def compile_one(i: int, name: str, lowered: Any) -> None:
    t0 = time.perf_counter()
    last[name] = lowered.compile()  # XLA releases the GIL while it compiles.
    comp_s[name].append(time.perf_counter() - t0)
    if progress is not None:
      progress(f"round {i + 1}/{reps}: compiled {name} in {comp_s[name][-1]:.1f} s")

  for i, order in enumerate(rounds(list(fns), reps)):
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
      futures = []
      for name in order:
        fn, args = fns[name]

        def fresh(*args, fn=fn):  # A new function: jax.jit's cache cannot serve it.
          return fn(*args)

        t0 = time.perf_counter()
        lowered = jax.jit(fresh, compiler_options=options).lower(*args)
        lower_s[name].append(time.perf_counter() - t0)
        # With several workers, lowering the next one overlaps these compilations.
        futures.append(pool.submit(compile_one, i, name, lowered))
        if workers <= 1:
          futures[-1].result()
      for future in futures:  # Raises what a compilation raised.
        future.result()
  base = np.add(lower_s[baseline], comp_s[baseline])
  out = {}
  for name in fns:
    total = np.add(lower_s[name], comp_s[name])
    out[name] = CompileTiming(
      lower_s[name], comp_s[name], float(np.median(total / base)),
      *fusion_counts(last[name].as_text()),
      bytes_accessed=cost(last[name], "bytes accessed"),
      parallel=workers > 1, compiled=last[name],
    )  # fmt: skip
  return out
