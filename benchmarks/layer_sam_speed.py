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
classes, BatchNorm), fed the digits upscaled to 32x32x3 (``benchmarks._tasks``;
real images, no download). Each step is also costed in FLOPs by XLA's
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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_lgm
from benchmarks import _tasks, _timing
from benchmarks._tasks import SHARE_FORWARD, XLA_CONFIGS, budget_mask, make_step
from examples import input_pipeline


def train_selection(task: _tasks.Task, args, data, mask=None) -> dict[str, Any]:
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
  names = optax_lgm.layer_names(task.params, args.layers, mask=mask)
  start = time.perf_counter()
  (params, stats, state), metrics = _tasks.train_pure(
    task, tx, step, data, steps=args.train_steps, batch=args.batch, seed=1
  )
  history = [(i, [names[j] for j in sel]) for i, sel in step.changes]
  loss = metrics.data["final_loss"]
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
  data = _tasks.digits(32)[0]
  task = _tasks.Task(data["image"])
  names = optax_lgm.layer_names(task.params, args.layers)
  trained = train_selection(task, args, data)
  budget = budget_mask(args.budget)
  budgeted = train_selection(task, args, data, mask=budget)
  params, stats = trained["params"], trained["stats"]
  out_side = _tasks.forward_order(names)[-args.k :]
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
  x, y = input_pipeline.batch_at(data, args.batch, 2, 0).values()
  configs = {
    k: v
    for k, v in XLA_CONFIGS.items()
    if args.xla == "both" or (args.xla == "share") == (v is not None)
  }
  runs, fns = {}, {}
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
      fns[f"{cfg}/{name}"] = lambda c=compiled, s=state: c(params, stats, s, x, y)
      runs[(cfg, name)] = dict(
        sel=sel, gflops=_tasks.cost_gflops(compiled), compile_s=compile_s
      )
  # Interleaved (benchmarks._timing), so that a slow spell of a shared machine
  # does not fall on one contender.
  timings = _timing.interleaved(
    fns, baseline=next(iter(fns)), reps=args.reps, warmup=args.steps_warmup
  )
  for (cfg, name), run in runs.items():
    run["ms"] = [1e3 * t for t in timings[f"{cfg}/{name}"].samples]

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
  data = _tasks.digits(32)[0]
  task = _tasks.Task(data["image"])
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
  records = collections.defaultdict(list)
  sgd_cos = []

  def probe_every(step: int, state, _) -> None:  # After ``step`` steps.
    if step % args.probe_every == 0:
      batch = input_pipeline.batch_at(data, args.batch, 1, step).values()
      out, c = jax.device_get(probe(*state[:2], *batch))
      sgd_cos.append(float(c))
      for key, r in out.items():
        records[key].append(r)

  start = time.perf_counter()
  (params, stats, _), _ = _tasks.train_pure(
    task, tx, jax.jit(make_step(task, tx, sam=False)), data,
    steps=args.train_steps, batch=args.batch, seed=1, after_step=probe_every,
  )  # fmt: skip
  probe_s = time.perf_counter() - start

  x, y = input_pipeline.batch_at(data, args.batch, 2, 0).values()
  flops = {}
  for name, tx_, sam in [("sgd", tx, False), ("sam", full, True)]:
    jitted = jax.jit(make_step(task, tx_, sam=sam), compiler_options=SHARE_FORWARD)
    flops[name] = _tasks.cost_gflops(
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
    gf = _tasks.cost_gflops(
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
