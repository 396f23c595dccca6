"""Step time of partial-layer SAM (``optax_lgm.layer_sam``) on a ResNet-20.

Compares, in one process, interleaved, the median time of one compiled
training step (after ``--steps-warmup`` untimed calls) of

* SGD (momentum 0.9),
* ``optax.contrib.sam`` (opaque mode, the same SGD),
* ``layer_sam`` in dynamic mode (``k`` layers chosen in the graph),
* ``layer_sam`` in static mode with the selection that training makes: a
  short training run with the documented loop (the first step dynamic, then
  ``select_layers`` every ``--reselect-every`` steps, the step jitted with
  ``selection`` static) picks it, and the run's number of compilations is
  reported,
* ``layer_sam`` in static mode with the ``k`` layers nearest the output,

on the CIFAR-shaped ResNet-20 of ``examples.models`` (32x32x3 inputs, 10
classes, BatchNorm), fed scikit-learn's digits upscaled to 32x32x3 (real
images, no download). Each step is also costed in FLOPs by XLA's
``cost_analysis``. Every contender is compiled twice: with XLA's default
passes, and with XLA's ``reshape-mover`` pass disabled. On XLA:CPU that pass
rewrites the first and the second forward pass of a BatchNorm network
differently (their users differ), so common-subexpression elimination can no
longer share the layers below the lowest perturbed one; without it the
static step's FLOPs drop to SGD's.

``--defaults`` runs instead the measurement behind ``layer_sam``'s defaults:
along a short SGD run, for ``layers`` in {leaf, module} and several ``k``,
how much of full SAM's gradient correction the layer-SAM gradient recovers,
the share of the squared gradient norm in the selected layers, how often the
selection changes, and the FLOPs of the static step.

Run: ``python -m benchmarks.layer_sam_speed [--batch 128 --reps 5]`` and
``python -m benchmarks.layer_sam_speed --defaults``.
"""

import argparse
import collections
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import optax_lgm
from examples import models

SHARE_FORWARD = {"xla_disable_hlo_passes": "reshape-mover"}
XLA_CONFIGS = {"default XLA passes": None, "reshape-mover disabled": SHARE_FORWARD}


def cifar_shaped_digits() -> tuple[np.ndarray, np.ndarray]:
  """The 1,797 digits, upscaled 4x to 32x32 and repeated over 3 channels."""
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)
  x = np.kron(x, np.ones((1, 4, 4), np.float32))
  return np.repeat(x[..., None], 3, axis=-1), digits.target.astype(np.int32)


class Task:
  """A ResNet-20 split into a pure loss over (params, batch statistics)."""

  def __init__(self, x: np.ndarray, seed: int = 0):
    mean = tuple(float(m) for m in x.mean(axis=(0, 1, 2)))
    std = tuple(float(s) for s in x.std(axis=(0, 1, 2)))
    model = models.resnet20(10, x.shape[1:], mean, std, rngs=nnx.Rngs(seed))
    self.graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    self.params = nnx.as_pure(params)
    self.stats = nnx.as_pure(stats)
    self.rest = nnx.as_pure(rest)

  def loss(self, params, stats, x, y):
    """Cross-entropy and the updated batch statistics."""
    model = nnx.merge(self.graphdef, params, stats, self.rest)
    logits = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, nnx.as_pure(nnx.state(model, nnx.BatchStat))

  def grad_fn(self, stats, x, y) -> Callable:
    """The second-pass gradient (params, i) -> grads; statistics discarded."""
    return jax.grad(lambda p, _: self.loss(p, stats, x, y)[0])


def make_step(task: Task, tx, *, sam: bool, traces: list | None = None):
  """A training step; ``selection`` (static) is passed on when given."""

  def step(params, stats, opt_state, x, y, selection=None):
    if traces is not None:
      traces.append(selection)  # Runs once per trace (compilation).
    grad = jax.value_and_grad(task.loss, has_aux=True)
    (loss, new_stats), grads = grad(params, stats, x, y)
    extra = {}
    if sam:
      extra["grad_fn"] = task.grad_fn(stats, x, y)
    if selection is not None:
      extra["selection"] = selection
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  return step


def path_name(path: tuple) -> str:
  """A key path as a layer name: ``blocks/8/conv1/kernel``."""
  parts = []
  for key in path:
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return "/".join(parts)


def budget_mask(prefixes: str | Sequence[str]) -> Callable[[Any], Any]:
  """A ``mask`` for ``layer_sam``: only leaves under ``prefixes`` are candidates.

  The selection budget: a static step costs what its lowest selected layer
  costs, so restricting the candidates to output-side layers bounds the cost.
  """
  prefixes = tuple(prefixes.split(",") if isinstance(prefixes, str) else prefixes)

  def mask(params):
    return jax.tree_util.tree_map_with_path(
      lambda path, _: path_name(path).startswith(prefixes), params
    )

  return mask


def forward_order(names: Sequence[str]) -> list[str]:
  """The layer names of the ResNet, sorted from input to output."""
  within = ("conv1", "bn1", "conv2", "bn2", "projection")

  def key(name: str):
    parts = name.split("/")
    if parts[0] in ("conv", "bn"):
      return (0, 0, parts[0] == "bn", name)
    if parts[0] == "blocks":
      sub = next((i for i, w in enumerate(within) if w == parts[2]), 9)
      return (1, int(parts[1]), sub, name)
    return (2, 0, 0, name)

  return sorted(names, key=key)


def batches(x, y, batch: int, seed: int):
  """Endless shuffled batches."""
  rng = np.random.default_rng(seed)
  while True:
    perm = rng.permutation(len(x))
    for i in range(len(x) // batch):
      idx = perm[i * batch : (i + 1) * batch]
      yield jnp.asarray(x[idx]), jnp.asarray(y[idx])


def cost_gflops(compiled) -> float:
  """XLA's FLOP count of a compiled step, in GFLOP."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) / 1e9


def train_selection(task: Task, args, data, mask=None) -> dict[str, Any]:
  """Trains with ``optax_lgm.StaticSelection``; returns what it selected."""
  tx = optax_lgm.layer_sam(
    optax.sgd(args.lr, momentum=0.9),
    rho=args.rho,
    k=args.k,
    layers=args.layers,
    mask=mask,
  )
  traces: list = []
  step = optax_lgm.StaticSelection(
    jax.jit(
      make_step(task, tx, sam=True, traces=traces),
      static_argnames="selection",
      compiler_options=SHARE_FORWARD if args.share_forward_in_training else None,
    ),
    every=args.reselect_every,
  )
  params, stats, state = task.params, task.stats, tx.init(task.params)
  names = optax_lgm.layer_names(params, args.layers, mask=mask)
  start = time.perf_counter()
  for _, (x, y) in zip(range(args.train_steps), batches(*data, args.batch, seed=1)):
    params, stats, state, loss = step(params, stats, state, x, y)
  history = [(i, [names[j] for j in sel]) for i, sel in step.changes]
  loss = float(loss)
  final = step.selection
  stats_by_layer = optax_lgm.layer_stats(state)
  top = sorted(
    stats_by_layer["sam_grad_norm_avg"].items(), key=lambda kv: -float(kv[1])
  )[:6]
  return dict(
    params=params,
    stats=stats,
    selection=final,
    selection_names=[names[j] for j in final],
    history=history,
    compilations=len(traces),
    distinct_selections=step.compilations,
    final_loss=loss,
    seconds=time.perf_counter() - start,
    top_norms=[(n, round(float(v), 4)) for n, v in top],
    selected_count={
      n: int(c) for n, c in stats_by_layer["sam_selected_count"].items() if c
    },
  )


def speed(args) -> None:
  """The step-time comparison."""
  data = cifar_shaped_digits()
  task = Task(data[0])
  names = optax_lgm.layer_names(task.params, args.layers)
  trained = train_selection(task, args, data)
  budget = budget_mask(args.budget)
  budgeted = train_selection(task, args, data, mask=budget)
  params, stats = trained["params"], trained["stats"]
  out_side = forward_order(names)[-args.k :]
  out_sel = tuple(sorted(names.index(n) for n in out_side))
  sgd = optax.sgd(args.lr, momentum=0.9)
  ls = optax_lgm.layer_sam(sgd, rho=args.rho, k=args.k, layers=args.layers)
  sam = optax.contrib.sam(
    sgd, optax.chain(optax.contrib.normalize(), optax.sgd(args.rho)), opaque_mode=True
  )
  contenders = [
    ("SGD", sgd, False, None),
    ("optax.contrib.sam", sam, True, None),
    (f"layer_sam dynamic, k={args.k}", ls, True, None),
    ("layer_sam static, training's selection", ls, True, trained["selection"]),
    ("layer_sam static, output-side layers", ls, True, out_sel),
    (
      f"layer_sam static, budget {args.budget}",
      optax_lgm.layer_sam(sgd, rho=args.rho, k=args.k, layers=args.layers, mask=budget),
      True,
      budgeted["selection"],
    ),
  ]
  x, y = next(batches(*data, args.batch, seed=2))
  configs = {
    k: v
    for k, v in XLA_CONFIGS.items()
    if args.xla == "both" or (args.xla == "share") == (v is not None)
  }
  runs = {}
  for cfg, options in configs.items():
    for name, tx, is_sam, sel in contenders:
      step = jax.jit(
        make_step(task, tx, sam=is_sam),
        static_argnames="selection",
        compiler_options=options,
      )
      state = tx.init(params)
      t0 = time.perf_counter()
      compiled = step.lower(params, stats, state, x, y, selection=sel).compile()
      compile_s = time.perf_counter() - t0
      fn = (lambda c, s: lambda: c(params, stats, s, x, y))(compiled, state)
      for _ in range(args.steps_warmup):
        jax.block_until_ready(fn())
      runs[(cfg, name)] = dict(
        fn=fn, sel=sel, gflops=cost_gflops(compiled), compile_s=compile_s, ms=[]
      )
  # Interleaved, in a new random order each round, so that a slow spell of a
  # shared machine does not fall on one contender.
  order = np.random.default_rng(0)
  for _ in range(args.reps):
    for key in order.permutation(len(runs)):
      run = list(runs.values())[key]
      t0 = time.perf_counter()
      jax.block_until_ready(run["fn"]())
      run["ms"].append((time.perf_counter() - t0) * 1e3)

  print(
    f"ResNet-20 ({sum(p.size for p in jax.tree.leaves(task.params)):,} params), "
    f"batch {args.batch}, layers={args.layers!r}, k={args.k}, rho={args.rho}, "
    f"{args.reps} interleaved reps after {args.steps_warmup} warm-up calls, "
    f"{jax.devices()[0].device_kind} ({jax.device_count()} device), "
    f"jax {jax.__version__}"
  )
  print(
    f"\nSelection training made ({args.train_steps} steps, first dynamic, "
    f"re-selected every {args.reselect_every}; final loss "
    f"{trained['final_loss']:.3f}, {trained['seconds']:.0f} s): "
    f"{trained['selection']} = {trained['selection_names']}"
  )
  print(f"Re-selections: {trained['history']}")
  print(
    f"Compilations of the training step: {trained['compilations']} "
    f"(1 dynamic + {trained['compilations'] - 1} static selections)"
  )
  print(f"Largest running layer norms: {trained['top_norms']}")
  print(f"Times each layer was selected: {trained['selected_count']}")
  print(f"Output-side layers: {out_sel} = {out_side}")
  print(
    f"Budgeted selection (candidates under {args.budget}): "
    f"{budgeted['selection']} = {budgeted['selection_names']}, "
    f"{budgeted['compilations']} compilations"
  )
  results = {}
  for cfg in configs:
    base = np.median(runs[(cfg, "SGD")]["ms"])
    sam_ms = np.median(runs[(cfg, "optax.contrib.sam")]["ms"])
    print(f"\n### {cfg}\n")
    print(
      "| contender | selection | GFLOP/step | median ms | min ms | × SGD | "
      "SAM ÷ this | GFLOP × SGD |"
    )
    print("|---|---|---|---|---|---|---|---|")
    base_gf = runs[(cfg, "SGD")]["gflops"]
    for (c, name), run in runs.items():
      if c != cfg:
        continue
      ms = float(np.median(run["ms"]))
      sel = "-" if run["sel"] is None else str(run["sel"])
      print(
        f"| {name} | {sel} | {run['gflops']:.2f} | {ms:.0f} | "
        f"{min(run['ms']):.0f} | {ms / base:.2f} | {sam_ms / ms:.2f} | "
        f"{run['gflops'] / base_gf:.2f} |"
      )
      results[f"{cfg}/{name}"] = dict(
        ms=run["ms"], gflops=run["gflops"], compile_s=run["compile_s"]
      )
    r = {name: np.median(run["ms"]) for (c, name), run in runs.items() if c == cfg}
    static_out = r["layer_sam static, output-side layers"] / base
    static_train = sam_ms / r["layer_sam static, training's selection"]
    dyn = r[f"layer_sam dynamic, k={args.k}"] / sam_ms
    static_budget = sam_ms / r[f"layer_sam static, budget {args.budget}"]
    print(
      f"\nTargets: static output-side {static_out:.2f}x SGD (<= 1.10: "
      f"{'met' if static_out <= 1.10 else 'missed'}); static with training's "
      f"selection {static_train:.2f}x faster than SAM (>= 1.5: "
      f"{'met' if static_train >= 1.3 else 'missed'} 1.3, "
      f"{'met' if static_train >= 1.5 else 'missed'} 1.5); budgeted selection "
      f"{static_budget:.2f}x faster than SAM (>= 1.5: "
      f"{'met' if static_budget >= 1.5 else 'missed'}); dynamic {dyn:.2f}x SAM "
      f"(<= 1.00: {'met' if dyn <= 1.0 else 'missed'})"
    )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
        dict(
          results=results,
          selection=list(trained["selection"]),
          budget=args.budget,
          budget_selection=list(budgeted["selection"]),
          budget_selection_names=budgeted["selection_names"],
          selection_names=trained["selection_names"],
          compilations=trained["compilations"],
          history=trained["history"],
        ),
        f,
        indent=2,
      )


def defaults(args) -> None:
  """The measurement behind the defaults ``layers`` and ``k``."""
  data = cifar_shaped_digits()
  task = Task(data[0])
  ks = [int(k) for k in args.ks.split(",")]
  configs = [(layers, k, "") for layers in ("leaf", "module") for k in ks]
  configs += [("module", k, args.budget) for k in ks]
  identity = optax.identity()
  full = optax_lgm.layer_sam(identity, rho=args.rho, k=None, unselected="recompute")
  partial = {
    (layers, k, budget): optax_lgm.layer_sam(
      identity,
      rho=args.rho,
      k=k,
      layers=layers,
      mask=budget_mask(budget) if budget else None,
    )
    for layers, k, budget in configs
  }

  def flat(tree):
    return jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(tree)])

  @jax.jit
  def probe(params, stats, x, y):
    grads = jax.grad(lambda p: task.loss(p, stats, x, y)[0])(params)
    grad_fn = task.grad_fn(stats, x, y)
    g = flat(grads)
    g_sam = flat(full.update(grads, full.init(params), params, grad_fn=grad_fn)[0])
    out = {}
    for key, tx in partial.items():
      upd, st = tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
      d, d_sam = flat(upd) - g, g_sam - g
      sq = jnp.square(st.grad_norm)
      out[key] = dict(
        captured=jnp.vdot(d, d_sam) / jnp.vdot(d_sam, d_sam),
        cosine=jnp.vdot(flat(upd), g_sam)
        / (jnp.linalg.norm(flat(upd)) * jnp.linalg.norm(g_sam)),
        share=jnp.sum(jnp.where(st.selected > 0, sq, 0.0)) / jnp.sum(sq),
        selected=st.selected,
      )
    sgd_cos = jnp.vdot(g, g_sam) / (jnp.linalg.norm(g) * jnp.linalg.norm(g_sam))
    return out, sgd_cos

  tx = optax.sgd(args.lr, momentum=0.9)
  step = jax.jit(make_step(task, tx, sam=False))
  params, stats, state = task.params, task.stats, tx.init(task.params)
  records = collections.defaultdict(list)
  sgd_cos = []
  start = time.perf_counter()
  for i, (x, y) in zip(range(args.train_steps), batches(*data, args.batch, seed=1)):
    if i % args.probe_every == 0:
      out, c = jax.device_get(probe(params, stats, x, y))
      sgd_cos.append(float(c))
      for key, r in out.items():
        records[key].append(r)
    params, stats, state, _ = step(params, stats, state, x, y)
  probe_s = time.perf_counter() - start

  x, y = next(batches(*data, args.batch, seed=2))
  flops = {}
  for name, tx_, sam in [("sgd", tx, False), ("sam", full, True)]:
    jitted = jax.jit(make_step(task, tx_, sam=sam), compiler_options=SHARE_FORWARD)
    flops[name] = cost_gflops(
      jitted.lower(params, stats, tx_.init(params), x, y).compile()
    )
  print(
    f"ResNet-20, batch {args.batch}, SGD lr {args.lr} momentum 0.9, "
    f"{args.train_steps} steps, probed every {args.probe_every} "
    f"({len(sgd_cos)} probes, {probe_s:.0f} s); rho={args.rho}. "
    f"'captured': <g~ - g, g_SAM - g> / |g_SAM - g|^2 (1 = full SAM's "
    f"correction, 0 = SGD); cosine(g, g_SAM) of plain SGD: "
    f"{np.mean(sgd_cos):.4f}. FLOPs with reshape-mover disabled; SGD "
    f"{flops['sgd']:.2f}, SAM {flops['sam']:.2f} GFLOP.\n"
  )
  print(
    "| layers | k | candidates | captured | cosine(g~, g_SAM) | norm² share of S | "
    "distinct selections | most frequent selection | static GFLOP (× SGD) |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  rows = {}
  for layers, k, budget in configs:
    recs = records[(layers, k, budget)]
    names = optax_lgm.layer_names(
      task.params, layers, mask=budget_mask(budget) if budget else None
    )
    sels = [tuple(np.flatnonzero(r["selected"]).tolist()) for r in recs]
    common = collections.Counter(sels).most_common(1)[0][0]
    tx_ = partial[(layers, k, budget)]
    jitted = jax.jit(
      make_step(task, tx_, sam=True),
      static_argnames="selection",
      compiler_options=SHARE_FORWARD,
    )
    gf = cost_gflops(
      jitted.lower(params, stats, tx_.init(params), x, y, selection=common).compile()
    )
    row = dict(
      captured=float(np.mean([r["captured"] for r in recs])),
      cosine=float(np.mean([r["cosine"] for r in recs])),
      share=float(np.mean([r["share"] for r in recs])),
      distinct=len(set(sels)),
      common=[names[j] for j in common],
      gflops=gf,
    )
    rows[f"{layers}/{k}" + (f"/{budget}" if budget else "")] = row
    print(
      f"| {layers} | {k} | {budget or 'all'} | {row['captured']:.3f} | "
      f"{row['cosine']:.4f} | "
      f"{row['share']:.3f} | {row['distinct']} | {', '.join(row['common'])} | "
      f"{gf:.2f} ({gf / flops['sgd']:.2f}) |"
    )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(rows=rows, sgd_cosine=sgd_cos, flops=flops), f, indent=2)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--steps-warmup", type=int, default=2)
  parser.add_argument("--k", type=int, default=2)
  parser.add_argument("--layers", default="module")
  parser.add_argument("--rho", type=float, default=0.05)
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--train-steps", type=int, default=40)
  parser.add_argument("--reselect-every", type=int, default=10)
  parser.add_argument(
    "--xla",
    choices=("both", "default", "share"),
    default="both",
    help="XLA pass configurations to time: default, reshape-mover disabled, both",
  )
  parser.add_argument(
    "--share-forward-in-training",
    action="store_true",
    help="compile the selection-training run with reshape-mover disabled",
  )
  parser.add_argument(
    "--budget",
    default="blocks/8,head",
    help="layer-name prefixes (comma-separated) a budgeted selection may perturb",
  )
  parser.add_argument("--defaults", action="store_true")
  parser.add_argument("--ks", default="1,2,4", help="k values for --defaults")
  parser.add_argument("--probe-every", type=int, default=10)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  if args.defaults:
    defaults(args)
  else:
    speed(args)


if __name__ == "__main__":
  main()
