"""Step time of partial-layer SAM (``optax_lgm.layer_sam``) on a ResNet-20.

Times one compiled training step, interleaved (`benchmarks._timing`), of SGD
(momentum 0.9), ``optax.contrib.sam`` (opaque, the same SGD), ``layer_sam``
dynamic, and ``layer_sam`` static with three selections: the one a short
training run makes through ``optax_lgm.StaticSelection``, the ``k`` layers
nearest the output, and the one training makes among the layers of
``--budget``; each costed in FLOPs by XLA and compiled with XLA's default passes
and with ``reshape-mover`` disabled (`_tasks.SHARE_FORWARD`). The model is the
ResNet-20 on the digits upscaled to 32x32x3 (`benchmarks._tasks`).

``--defaults`` measures instead, along a short SGD run, for ``layers`` in
{leaf, module} and several ``k``: how much of full SAM's gradient correction the
layer-SAM gradient recovers, the squared gradient norm's share in the selected
layers, how often the selection changes, and the FLOPs of the static step.
``docs/results.rst`` reads both.

Run: ``python -m benchmarks.layer_sam_speed [--batch 128 --reps 5]`` and
``python -m benchmarks.layer_sam_speed --defaults``.
"""

import collections
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_lgm
from benchmarks import _tasks, _timing
from benchmarks._tasks import SHARE_FORWARD, budget_mask
from examples import input_pipeline, loop

XLA_CONFIGS = {"default XLA passes": None, "reshape-mover disabled": SHARE_FORWARD}
MEANS = ("captured", "cosine", "share")  # The probes' figures averaged (--defaults).


def train_selection(task: _tasks.Task, tx, args, data, mask=None) -> dict[str, Any]:
  """Trains ``tx`` with ``optax_lgm.StaticSelection``; returns what it selected."""
  traces: list = []
  options = SHARE_FORWARD if args.share_forward_in_training else None
  step = optax_lgm.StaticSelection(
    _tasks.jit_step(task, tx, sam=True, traces=traces, options=options),
    every=args.reselect_every,
  )
  names = optax_lgm.layer_names(task.params, args.layers, mask=mask)
  start = time.perf_counter()
  (params, stats, state), metrics = _tasks.train_pure(
    task, tx, step, data, steps=args.train_steps, batch=args.batch, seed=1
  )
  if step.selection is None:  # Only the dynamic first steps ran.
    raise SystemExit(
      f"error: --train-steps {args.train_steps} ended before the first "
      f"re-selection (every {args.reselect_every} steps); make it at least that"
    )
  by_layer = optax_lgm.layer_stats(state)
  norms = sorted(by_layer["sam_grad_norm_avg"].items(), key=lambda kv: -float(kv[1]))
  return dict(
    params=params, stats=stats, selection=step.selection,
    selection_names=[names[j] for j in step.selection],
    history=[(i, [names[j] for j in sel]) for i, sel in step.changes],
    compilations=len(traces), final_loss=metrics.data["final_loss"],
    seconds=time.perf_counter() - start,
    top_norms=[(n, round(float(v), 4)) for n, v in norms[:6]],
    selected_count={n: int(c) for n, c in by_layer["sam_selected_count"].items() if c},
  )  # fmt: skip


def speed(args, argv) -> None:
  """The step-time comparison."""
  data = _tasks.digits(32)[0]
  task = _tasks.Task(data["image"])
  names = optax_lgm.layer_names(task.params, args.layers)
  budget = budget_mask(args.budget)
  sgd = optax.sgd(args.lr, momentum=0.9)
  layer_sam = dict(rho=args.rho, k=args.k, layers=args.layers)
  ls = optax_lgm.layer_sam(sgd, **layer_sam)
  ls_budget = optax_lgm.layer_sam(sgd, **layer_sam, mask=budget)
  trained = train_selection(task, ls, args, data)
  budgeted = train_selection(task, ls_budget, args, data, mask=budget)
  params, stats = trained["params"], trained["stats"]
  out_side, out_sel = _tasks.output_side(names, args.k)
  dynamic = f"layer_sam dynamic, k={args.k}"
  budget_name = f"layer_sam static, budget {args.budget}"
  contenders = {  # Name -> (transformation, takes grad_fn, static selection).
    "SGD": (sgd, False, None),
    "optax.contrib.sam": (_tasks.opaque_sam(sgd, args.rho), True, None),
    dynamic: (ls, True, None),
    "layer_sam static, training's selection": (ls, True, trained["selection"]),
    "layer_sam static, output-side layers": (ls, True, out_sel),
    budget_name: (ls_budget, True, budgeted["selection"]),
  }
  batch = tuple(input_pipeline.batch_at(data, args.batch, 2, 0).values())
  configs = {
    k: v
    for k, v in XLA_CONFIGS.items()
    if args.xla == "both" or (args.xla == "share") == (v is not None)
  }
  runs, fns = {}, {}
  for cfg, options in configs.items():
    comp, calls = _tasks.compile_steps(
      task, contenders, params, stats, batch, baseline="SGD", options=options
    )
    for name, c in comp.items():
      fns[f"{cfg}/{name}"] = calls[name]
      gflops = _timing.cost(c.compiled, "flops") / 1e9
      runs[f"{cfg}/{name}"] = dict(gflops=gflops, compile_s=c.total_s)
  timings = _timing.interleaved(
    fns, baseline=next(iter(fns)), reps=args.reps, warmup=args.steps_warmup
  )
  results = {
    key: {"ms": [1e3 * t for t in timings[key].samples], **run}
    for key, run in runs.items()
  }

  print(
    f"ResNet-20 ({sum(p.size for p in jax.tree.leaves(task.params)):,} params), "
    f"batch {args.batch}, layers={args.layers!r}, k={args.k}, rho={args.rho}, "
    f"{args.reps} interleaved reps after {args.steps_warmup} warm-up calls, "
    f"{jax.devices()[0].device_kind} ({jax.device_count()} device), "
    f"jax {jax.__version__}\n"
    f"\nSelection training made ({args.train_steps} steps, first dynamic, "
    f"re-selected every {args.reselect_every}; final loss "
    f"{trained['final_loss']:.3f}, {trained['seconds']:.0f} s): "
    f"{trained['selection']} = {trained['selection_names']}\n"
    f"Re-selections: {trained['history']}\n"
    f"Compilations of the training step: {trained['compilations']} "
    f"(1 dynamic + {trained['compilations'] - 1} static selections)\n"
    f"Largest running layer norms: {trained['top_norms']}\n"
    f"Times each layer was selected: {trained['selected_count']}\n"
    f"Output-side layers: {out_sel} = {out_side}\n"
    f"Budgeted selection (candidates under {args.budget}): "
    f"{budgeted['selection']} = {budgeted['selection_names']}, "
    f"{budgeted['compilations']} compilations"
  )
  selections = {name: sel for name, (_, _, sel) in contenders.items()}
  result = dict(
    **_tasks.record("benchmarks.layer_sam_speed", argv), settings=vars(args),
    contenders={n: None if s is None else list(s) for n, s in selections.items()},
    results=results, selection=list(trained["selection"]), budget=args.budget,
    budget_selection=list(budgeted["selection"]),
    budget_selection_names=budgeted["selection_names"],
    selection_names=trained["selection_names"],
    compilations=trained["compilations"], history=trained["history"],
  )  # fmt: skip
  tables = loop.docs_script("make_tables")
  for cfg, (_, table) in zip(configs, tables.layer_sam_speed_tables(result)):
    print(f"\n### {cfg}\n\n" + tables.markdown(table))
    run = {name: results[f"{cfg}/{name}"] for name in contenders}
    ms = {name: float(np.median(r["ms"])) for name, r in run.items()}
    base, sam_ms = ms["SGD"], ms["optax.contrib.sam"]
    static_out = ms["layer_sam static, output-side layers"] / base
    static_train = sam_ms / ms["layer_sam static, training's selection"]
    dyn, static_budget = ms[dynamic] / sam_ms, sam_ms / ms[budget_name]
    met = {True: "met", False: "missed"}
    print(
      f"\nTargets: static output-side {static_out:.2f}x SGD (<= 1.10: "
      f"{met[static_out <= 1.10]}); static with training's selection "
      f"{static_train:.2f}x faster than SAM (>= 1.5: {met[static_train >= 1.3]} "
      f"1.3, {met[static_train >= 1.5]} 1.5); budgeted selection "
      f"{static_budget:.2f}x faster than SAM (>= 1.5: {met[static_budget >= 1.5]}); "
      f"dynamic {dyn:.2f}x SAM (<= 1.00: {met[dyn <= 1.0]})"
    )
  _tasks.write_json(args.json, result)


def defaults(args, argv) -> None:
  """The measurement behind the defaults ``layers`` and ``k``."""
  data = _tasks.digits(32)[0]
  task = _tasks.Task(data["image"])
  ks = [int(k) for k in args.ks.split(",")]
  configs = [(layers, k, "") for layers in ("leaf", "module") for k in ks]
  configs += [("module", k, args.budget) for k in ks]
  identity = optax.identity()
  full = optax_lgm.layer_sam(identity, rho=args.rho, k=None, unselected="recompute")
  masks = {b: budget_mask(b) if b else None for b in ("", args.budget)}
  partial = {
    (layers, k, budget): optax_lgm.layer_sam(
      identity, rho=args.rho, k=k, layers=layers, mask=masks[budget]
    )
    for layers, k, budget in configs
  }

  def flat(tree):
    return jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(tree)])

  def cosine(a, b):
    return jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))

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
        cosine=cosine(flat(upd), g_sam),
        share=jnp.sum(jnp.where(st.selected > 0, sq, 0.0)) / jnp.sum(sq),
        selected=st.selected,
      )
    return out, cosine(g, g_sam)

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
    task, tx, _tasks.jit_step(task, tx, sam=False), data,
    steps=args.train_steps, batch=args.batch, seed=1, after_step=probe_every,
  )  # fmt: skip
  probe_s = time.perf_counter() - start

  batch = tuple(input_pipeline.batch_at(data, args.batch, 2, 0).values())

  def gflops(tx, sam: bool, selection=None) -> float:
    contender = {"": (tx, sam, selection)}
    comp, _ = _tasks.compile_steps(
      task, contender, params, stats, batch, baseline="", options=SHARE_FORWARD
    )
    return _timing.cost(comp[""].compiled, "flops") / 1e9

  flops = {"sgd": gflops(tx, False), "sam": gflops(full, True)}
  print(
    f"ResNet-20, batch {args.batch}, SGD lr {args.lr} momentum 0.9, "
    f"{args.train_steps} steps, probed every {args.probe_every} "
    f"({len(sgd_cos)} probes, {probe_s:.0f} s); rho={args.rho}. "
    f"'captured': <g~ - g, g_SAM - g> / |g_SAM - g|^2 (1 = full SAM's "
    f"correction, 0 = SGD); cosine(g, g_SAM) of plain SGD: "
    f"{np.mean(sgd_cos):.4f}. FLOPs with reshape-mover disabled; SGD "
    f"{flops['sgd']:.2f}, SAM {flops['sam']:.2f} GFLOP.\n"
  )
  rows = {}
  for layers, k, budget in configs:
    recs = records[layers, k, budget]
    names = optax_lgm.layer_names(task.params, layers, mask=masks[budget])
    sels = [tuple(np.flatnonzero(r["selected"]).tolist()) for r in recs]
    common = collections.Counter(sels).most_common(1)[0][0]
    gf = gflops(partial[layers, k, budget], True, common)
    row = {key: float(np.mean([r[key] for r in recs])) for key in MEANS}
    row.update(distinct=len(set(sels)), common=[names[j] for j in common], gflops=gf)
    row.update(layers=layers, k=k, budget=budget)
    rows[f"{layers}/{k}" + (f"/{budget}" if budget else "")] = row
  result = dict(
    **_tasks.record("benchmarks.layer_sam_speed", argv), settings=vars(args),
    rows=rows, sgd_cosine=sgd_cos, flops=flops,
  )  # fmt: skip
  tables = loop.docs_script("make_tables")
  print(tables.markdown(tables.layer_sam_defaults_table(result)))
  _tasks.write_json(args.json, result)


def main(argv=None) -> None:
  args = _tasks.parser(
    __doc__, batch=128, reps=5, steps_warmup=2, k=2, layers="module", rho=0.05,
    lr=0.05, train_steps=40, reselect_every=10,
    share_forward_in_training=(
      False, "compile the selection-training run with reshape-mover disabled"
    ),
    budget="blocks/8,head", defaults=False, ks=("1,2,4", "k values for --defaults"),
    probe_every=10, json=None,
    xla=(
      ["both", "default", "share"],
      "XLA pass configurations to time: default, reshape-mover disabled, both",
    ),
  ).parse_args(argv)  # fmt: skip
  if args.defaults:
    defaults(args, argv)
  else:
    speed(args, argv)


if __name__ == "__main__":
  main()
