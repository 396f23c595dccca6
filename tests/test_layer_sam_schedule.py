"""Tests of layer_sam's perturbation schedules (LookSAM, RST, AE-SAM).

The checks on a simulated 8-device mesh (and a 4x2 one) run this file as a
script in a process of its own (``python tests/test_layer_sam_schedule.py mesh
8``) with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``, so that the
rest of the suite keeps one device; it prints what it measured as JSON and the
assertions are made in the test process.
"""

import functools
import json
import os
import pathlib
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _layer_sam_reference import ScheduledLayerSam

import optax_lgm

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The model of test_layer_sam: layers a, b, c, d of clearly different norms.
if __name__ != "__main__":
  from test_layer_sam import (
    X,
    Y,
    batch_loss,
    grad_fn,
    init_params,
    jit_step,
    np_batch_grad,
  )


def to_numpy(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def random_draws(seed: int, probability: float, steps: int) -> list[bool]:
  """The decisions of ``schedule="random"``: the key chain of the state."""
  key, out = jax.random.PRNGKey(seed), []
  for _ in range(steps):
    key, draw = jax.random.split(key)
    out.append(bool(jax.random.bernoulli(draw, probability)))
  return out


# --------------------------------------------------------------------------
# The algorithm, against the float64 NumPy reference, step by step.
# --------------------------------------------------------------------------

STEPS = 10
SCHEDULES = {
  "every_3": dict(every=3),
  "every_2_orthogonal": dict(every=2, skipped="orthogonal"),
  "random": dict(schedule="random", probability=0.5, seed=1),
  "random_orthogonal": dict(
    schedule="random",
    probability=0.4,
    seed=2,
    skipped="orthogonal",
    orthogonal_scale=0.5,
  ),
  "adaptive": dict(schedule="adaptive", threshold=0.3, threshold_decay=0.8),
  "adaptive_schedule_orthogonal": dict(
    schedule="adaptive",
    threshold=optax.linear_schedule(-1.0, 1.0, STEPS),
    skipped="orthogonal",
  ),
}


def reference(w, schedule_kwargs, **hyper):
  """The NumPy reference with the arguments of ``layer_sam``."""
  kw = dict(schedule_kwargs)
  names = dict(threshold_decay="delta", orthogonal_scale="alpha")
  kw = {names.get(key, key): value for key, value in kw.items()}
  if kw.get("schedule") == "random":
    kw["draws"] = random_draws(kw.pop("seed"), kw.pop("probability"), STEPS)
  if callable(kw.get("threshold")):
    kw["threshold"] = lambda t, f=kw["threshold"]: float(f(t))
  return ScheduledLayerSam(w, np_batch_grad, **kw, **hyper)


def minibatches(steps: int, size: int = 6) -> list:
  """A different batch of rows of ``X`` at each step (the norms then vary)."""
  rng = np.random.default_rng(5)
  return [
    (X[idx], Y[idx]) for idx in (rng.choice(len(X), size, False) for _ in range(steps))
  ]


def batch_step(tx):
  @jax.jit
  def step(params, state, x, y):
    g_fn = jax.grad(lambda p, _: batch_loss(p, x, y))
    updates, state = tx.update(g_fn(params, 0), state, params, grad_fn=g_fn)
    return optax.apply_updates(params, updates), state, updates

  return step


@pytest.mark.parametrize("unselected", ["reuse", "recompute"])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_matches_numpy_reference(name, unselected):
  hyper = dict(k=2, rho=0.3, unselected=unselected)
  tx = optax_lgm.layer_sam(optax.sgd(0.1), **hyper, **SCHEDULES[name])
  step = batch_step(tx)
  params = init_params()
  state = tx.init(params)
  ref = reference(to_numpy(params), SCHEDULES[name], lr=0.1, **hyper)
  counts = np.zeros(4, int)
  for x, y in minibatches(STEPS):
    params, state, _ = step(
      params, state, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    )
    ref.step([(x, y)])
    assert int(state.perturbed) == ref.taken[-1], ref.taken
    chex.assert_trees_all_close(params, ref.w, rtol=1e-5, atol=1e-6)
    if "skipped" in SCHEDULES[name]:
      scale = max(np.max(np.abs(v)) for v in jax.tree.leaves(ref.g_v))
      chex.assert_trees_all_close(state.orthogonal, ref.g_v, atol=1e-4 * scale)
    # Each step from the same point: the stored component is a small
    # difference of float32 gradients, whose rounding the next steps amplify.
    ref.w, ref.g_v = to_numpy(params), to_numpy(state.orthogonal)
    counts += np.asarray(state.selected) * ref.taken[-1]
  # Both kinds of step ran: the comparison covers the skipped steps.
  assert 0 < sum(ref.taken) < STEPS, ref.taken
  assert int(state.perturbed_count) == sum(ref.taken)
  np.testing.assert_array_equal(state.selected_count, counts)
  np.testing.assert_allclose(state.sq_norm_avg, ref.mu, rtol=1e-5)


def test_every_k_steps_pattern():
  tx = optax_lgm.layer_sam(optax.sgd(0.1), k=2, every=4)
  step = jit_step(tx)
  params, state = init_params(), tx.init(init_params())
  taken = []
  for _ in range(9):
    params, state, _ = step(params, state)
    taken.append(int(state.perturbed))
  assert taken == [1, 0, 0, 0, 1, 0, 0, 0, 1]


# --------------------------------------------------------------------------
# Every step perturbed: today's layer_sam, and optax's SAM.
# --------------------------------------------------------------------------


def run(tx, steps=5, params=None):
  step = jit_step(tx)
  params = init_params() if params is None else params
  state = tx.init(params)
  out = []
  for _ in range(steps):
    params, state, updates = step(params, state)
    out.append((params, updates))
  return out, state


@pytest.mark.parametrize(
  "schedule",
  [
    dict(every=1),
    dict(every=1, skipped="orthogonal"),
    dict(schedule="random", probability=1.0),
    dict(schedule="adaptive", threshold=-1e30),
  ],
  ids=["every_1", "every_1_orthogonal", "random_p1", "adaptive_always"],
)
def test_always_perturbing_equals_layer_sam_bit_for_bit(schedule):
  opt = optax.sgd(0.1, momentum=0.9)
  today, state_today = run(optax_lgm.layer_sam(opt, 0.3, k=2))
  scheduled, state = run(optax_lgm.layer_sam(opt, 0.3, k=2, **schedule))
  chex.assert_trees_all_equal(scheduled, today)
  assert int(state.perturbed_count) == 5
  np.testing.assert_array_equal(state.selected_count, state_today.selected_count)


def test_injected_every_1_equals_layer_sam_bit_for_bit():
  # An injected every is an array: the step takes the conditional.
  opt = optax.sgd(0.1, momentum=0.9)
  today, _ = run(optax_lgm.layer_sam(opt, 0.3, k=2))
  injected, state = run(optax.inject_hyperparams(optax_lgm.layer_sam)(opt, 0.3, k=2))
  assert state.hyperparams["every"].dtype == jnp.int32
  chex.assert_trees_all_equal(injected, today)


@pytest.mark.parametrize(
  "schedule",
  [dict(every=1), dict(schedule="random", probability=1.0)],
  ids=["every_1", "random_p1"],
)
def test_every_layer_every_step_is_optax_sam(schedule):
  rho = 0.2
  opt = optax.sgd(0.3, momentum=0.9)
  ours = optax_lgm.layer_sam(opt, rho, k=None, unselected="recompute", **schedule)
  ref = optax.contrib.sam(
    opt, optax.chain(optax.contrib.normalize(), optax.sgd(rho)), opaque_mode=True
  )

  def opaque_step(tx):
    @jax.jit
    def step(params, state):
      updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
      return optax.apply_updates(params, updates), state

    return step

  step1, step2 = opaque_step(ours), opaque_step(ref)
  p1 = p2 = init_params()
  s1, s2 = ours.init(p1), ref.init(p2)
  for _ in range(5):
    p1, s1 = step1(p1, s1)
    p2, s2 = step2(p2, s2)
    chex.assert_trees_all_close(p1, p2, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------
# Static mode, StaticSelection, resume.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["every", "adaptive", "random"])
def test_only_the_random_schedule_advances_the_key(schedule):
  tx = optax_lgm.layer_sam(optax.sgd(0.1), 0.3, k=2, schedule=schedule, every=2)
  step = jit_step(tx)
  params = init_params()
  state = first = tx.init(params)
  for _ in range(3):
    params, state, _ = step(params, state)
  moved = not np.array_equal(np.asarray(state.key), np.asarray(first.key))
  assert moved == (schedule == "random")


def test_static_selection_with_a_schedule():
  # The first step may be skipped (seed 1, p=0.3: it is): the state still
  # records the selection, so StaticSelection picks as many layers as k.
  assert not random_draws(1, 0.3, 1)[0]
  tx = optax_lgm.layer_sam(
    optax.sgd(0.1), 0.3, k=2, schedule="random", probability=0.3, seed=1
  )
  traces = []

  @functools.partial(jax.jit, static_argnames="selection")
  def train_step(params, state, selection=None):
    traces.append(selection)
    updates, state = tx.update(
      grad_fn(params), state, params, grad_fn=grad_fn, selection=selection
    )
    return optax.apply_updates(params, updates), state

  # Decisions at once, in the foreground: the selection depends on the state.
  step = optax_lgm.StaticSelection(train_step, every=4, background=False, payoff=0)
  params, state = init_params(), tx.init(init_params())
  for _ in range(10):
    params, state = step(params, state)
  assert step.selection == (1, 3)  # b and d: the largest norms.
  assert len(traces) == step.compilations == 2  # Dynamic, then (1, 3).
  assert 0 < int(state.perturbed_count) < 10


@pytest.mark.parametrize("name", ["random_orthogonal", "adaptive_schedule_orthogonal"])
def test_resume_from_state_equals_uninterrupted_run(name, tmp_path):
  tx = optax_lgm.layer_sam(optax.sgd(0.1, momentum=0.9), 0.3, k=2, **SCHEDULES[name])
  step = jit_step(tx)
  params, state = init_params(), tx.init(init_params())
  for _ in range(4):
    params, state, _ = step(params, state)
  # What a checkpoint holds: host arrays, written and read back.
  leaves, treedef = jax.tree.flatten((params, state))
  np.savez(tmp_path / "ckpt.npz", *[np.asarray(x) for x in leaves])
  with np.load(tmp_path / "ckpt.npz") as saved:
    restored = [jnp.asarray(saved[f"arr_{i}"]) for i in range(len(leaves))]
  r_params, r_state = jax.tree.unflatten(treedef, restored)
  taken = []
  for _ in range(6):
    params, state, _ = step(params, state)
    r_params, r_state, _ = step(r_params, r_state)
    taken.append(int(state.perturbed))
  chex.assert_trees_all_equal((r_params, r_state), (params, state))
  assert 0 < sum(taken) < 6, taken


# --------------------------------------------------------------------------
# Robustness: non-finite steps, diagnostics, bad arguments.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["every_2_orthogonal", "random", "adaptive"])
def test_nonfinite_step_keeps_state_and_schedule(name):
  tx = optax.apply_if_finite(
    optax_lgm.layer_sam(optax.sgd(0.1, momentum=0.9), 0.3, k=2, **SCHEDULES[name]),
    max_consecutive_errors=0,  # Every non-finite gradient reaches layer_sam.
  )
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))
  params = init_params()
  _, state = step(grad_fn(params), tx.init(params), params)
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grad_fn(params))
  _, nan_state = step(bad, state, params)
  chex.assert_trees_all_equal(nan_state.inner_state, state.inner_state)
  chex.assert_tree_all_finite(nan_state.inner_state)
  after_nan = step(grad_fn(params), nan_state, params)[0]
  without_nan = step(grad_fn(params), state, params)[0]
  chex.assert_trees_all_equal(after_nan, without_nan)


def test_multi_steps_counts_updates():
  inner = optax_lgm.layer_sam(optax.sgd(0.1), 0.3, k=2, every=2)
  tx = optax.MultiSteps(inner, every_k_schedule=2)
  step = jax.jit(lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn))
  params = init_params()
  state = tx.init(params)
  for _ in range(8):
    _, state = step(params, state)
  # layer_sam ran on every second micro-step: 4 updates, 2 of them perturbed.
  assert int(state.inner_opt_state.count) == 4
  assert int(state.inner_opt_state.perturbed_count) == 2


def test_diagnostics():
  tx = optax_lgm.layer_sam(optax.sgd(0.1), k=2, every=3)
  params, state = init_params(), tx.init(init_params())
  step = jit_step(tx)
  for _ in range(7):
    params, state, _ = step(params, state)
  stats = optax_lgm.layer_stats(state)
  assert stats["sam_perturbed_steps"] == {"a": 3, "b": 3, "c": 3, "d": 3}
  assert stats["sam_selected_count"] == {"a": 0, "b": 3, "c": 0, "d": 3}
  assert int(state.count) == 7 and int(state.perturbed) == 1
  chex.assert_type(
    [state.perturbed, state.perturbed_count, state.sq_norm_avg, state.sq_norm_var],
    [jnp.int32, jnp.int32, jnp.float32, jnp.float32],
  )


def test_bf16_orthogonal_state_keeps_dtypes():
  params = init_params(jnp.bfloat16)
  tx = optax_lgm.layer_sam(optax.sgd(0.1), k=2, every=2, skipped="orthogonal")
  g_fn = jax.grad(
    lambda p, i=0: jnp.sum(jnp.square(jnp.tanh(jnp.concatenate(
      [v.astype(jnp.float32).ravel() for v in jax.tree.leaves(p)]))))
  )  # fmt: skip
  state = tx.init(params)
  for selection in (None, (1, 3)):
    for _ in range(2):  # A perturbed step, then a skipped one.
      updates, new_state = tx.update(
        g_fn(params), state, params, grad_fn=g_fn, selection=selection
      )
      chex.assert_trees_all_equal_dtypes(updates, params)
      chex.assert_trees_all_equal_dtypes(new_state, state)
      state = new_state


@pytest.mark.parametrize(
  "kwargs,error,match",
  [
    (dict(schedule="sometimes"), ValueError, "schedule="),
    (dict(skipped="zero"), ValueError, "skipped="),
    (dict(every=0), ValueError, "every=0"),
    (dict(every=2.0), TypeError, "every=2.0"),
    (dict(every=True), TypeError, "every=True"),
    (dict(seed=1.5), TypeError, "seed=1.5"),
    (dict(probability=1.5), ValueError, "probability=1.5"),
    (dict(threshold_decay=-0.1), ValueError, "threshold_decay"),
    (dict(orthogonal_scale=-1.0), ValueError, "orthogonal_scale"),
    (dict(threshold=float("nan")), ValueError, "threshold"),
  ],
)
def test_bad_schedule_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    optax_lgm.layer_sam(optax.sgd(0.1), **kwargs)


# --------------------------------------------------------------------------
# One compilation, and the second pass inside the conditional.
# --------------------------------------------------------------------------


def test_one_compilation_serves_both_kinds_of_step():
  chex.clear_trace_counter()
  tx = optax_lgm.layer_sam(optax.sgd(0.1), 0.3, k=2, schedule="random", seed=1)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state):
    updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  params, state = init_params(), tx.init(init_params())
  taken = []
  for _ in range(8):
    params, state = step(params, state)
    taken.append(int(state.perturbed))
  assert 0 < sum(taken) < 8, taken
  assert step._cache_size() == 1


def _computations(hlo: str) -> dict[str, str]:
  """The computations of an optimised HLO module, by name: their bodies."""
  blocks = re.findall(
    r"\n(?:ENTRY )?%?([\w.\-]+) \(.*?\) -> .*? \{\n(.*?)\n\}", hlo, re.S
  )
  return dict(blocks)


def _reachable(name: str, comps: dict[str, str]) -> set[str]:
  """``name`` and every computation its body calls, transitively."""
  seen, todo = set(), [name]
  while todo:
    current = todo.pop()
    if current in seen or current not in comps:
      continue
    seen.add(current)
    todo += re.findall(r"%([\w.\-]+)", comps[current])
  return seen & set(comps)


def _count(op: str, names: set[str], comps: dict[str, str]) -> int:
  return sum(len(re.findall(rf"= \S+ {op}\(", comps[n])) for n in names)


@pytest.mark.parametrize("selection", [None, (1, 3)])
def test_second_pass_is_inside_the_conditional(selection):
  tx = optax_lgm.layer_sam(optax.sgd(0.1), 0.3, k=2, every=2)

  def step(params, state):
    g_fn = jax.grad(loss_with_dot)
    updates, state = tx.update(
      g_fn(params, 0), state, params, grad_fn=g_fn, selection=selection
    )
    return optax.apply_updates(params, updates), state

  params = init_params()
  hlo = jax.jit(step).lower(params, tx.init(params)).compile().as_text()
  conditionals = re.findall(r"conditional\(.*", hlo)
  assert len(conditionals) == 1, conditionals
  # branch_computations={%a, %b}, or true_computation=%a, false_computation=%b.
  called = re.findall(
    r"(?:branch_computations=\{|true_computation=|false_computation=)([^}]*)",
    conditionals[0],
  )
  branches = re.findall(
    r"%?([\w.\-]+)", ",".join(c.split(", metadata")[0] for c in called)
  )
  branches = [b for b in branches if not b.endswith("_computation")]
  comps = _computations(hlo)
  inside = [_reachable(b, comps) for b in branches]
  dots = sorted(_count("dot", names, comps) for names in inside)
  # One branch holds the second pass (a forward and a backward product), the
  # other none; the first pass stays outside.
  assert dots[0] == 0 and dots[-1] >= 2, dots
  everything = _count("dot", set(comps), comps)
  assert everything - dots[-1] >= 2, (everything, dots)


def loss_with_dot(params, i=0):
  theta = jnp.concatenate([v.ravel() for v in jax.tree.leaves(params)])
  return 0.5 * jnp.mean(jnp.square(jnp.tanh(jnp.asarray(X, jnp.float32) @ theta) - Y))


# --------------------------------------------------------------------------
# The decision on the host (perturb=True / False): two programs, no conditional.
# --------------------------------------------------------------------------


def _mlp_problem(seed, rows, sizes, scale):
  """An MLP's params, a batch and its squared loss ``loss(p, x, y)``."""
  rng = np.random.default_rng(seed)
  n_in, hidden, n_out = sizes
  params = {
    "hidden": {"kernel": jnp.asarray(rng.normal(size=(n_in, hidden)) * scale)},
    "out": {"kernel": jnp.asarray(rng.normal(size=(hidden, n_out)) * scale)},
  }
  params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  x = jnp.asarray(rng.normal(size=(rows, n_in)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(rows, n_out)), jnp.float32)

  def loss(p, x, y):
    h = jnp.tanh(x @ p["hidden"]["kernel"])
    return jnp.mean(jnp.square(h @ p["out"]["kernel"] - y))

  return params, x, y, loss


def _mlp():
  params, x, y, loss = _mlp_problem(3, 12, (5, 8, 2), 0.5)
  return params, lambda p, i=0: loss(p, x, y)


def _conv_net():
  rng = np.random.default_rng(4)
  params = {
    "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)) * 0.3, jnp.float32)},
    "out": {"kernel": jnp.asarray(rng.normal(size=(4, 3)) * 0.3, jnp.float32)},
  }
  x = jnp.asarray(rng.normal(size=(6, 6, 6, 2)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)

  def loss(p, i=0):
    h = jax.lax.conv_general_dilated(
      x, p["conv"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.mean(jnp.square(jnp.tanh(h).mean((1, 2)) @ p["out"]["kernel"] - y))

  return params, loss


HOST_MODELS = {"mlp": _mlp, "conv": _conv_net}


def host_step(tx, loss):
  """A jitted step whose ``perturb`` is static (one program per value)."""

  @functools.partial(jax.jit, static_argnames="perturb")
  def step(params, state, perturb=None):
    g_fn = jax.grad(loss)
    updates, state = tx.update(
      g_fn(params, 0), state, params, grad_fn=g_fn, perturb=perturb
    )
    return optax.apply_updates(params, updates), state

  return step


# The integer fields (the decision, the counts, the key, the selection) are
# equal bit for bit. So is everything on the MLP; on the conv net XLA:CPU
# fuses the convolutions of both passes differently when they share the entry
# computation: with every=2 a few weights differ in the last bits (measured
# 9e-6 relative at most over the 7 steps, jax 0.10).
EXACT = ("count", "selected", "selected_count", "perturbed", "perturbed_count", "key")


@pytest.mark.parametrize("skipped", ["plain", "orthogonal"])
@pytest.mark.parametrize("every", [2, 3])
@pytest.mark.parametrize("model", list(HOST_MODELS))
def test_host_decision_equals_conditional(model, every, skipped):
  params, loss = HOST_MODELS[model]()
  tx = optax_lgm.layer_sam(
    optax.sgd(0.1, momentum=0.9), 0.1, k=1, every=every, skipped=skipped
  )
  step = host_step(tx, loss)
  cond = host = (params, tx.init(params))
  for i in range(7):
    cond = step(*cond)
    host = step(*host, perturb=(i % every == 0))
    for name in EXACT:
      chex.assert_trees_all_equal(getattr(host[1], name), getattr(cond[1], name))
    if model == "mlp":
      chex.assert_trees_all_equal(host, cond)
    else:
      chex.assert_trees_all_close(host, cond, rtol=1e-5, atol=1e-6)
  assert int(host[1].perturbed_count) == len(range(0, 7, every))
  assert step._cache_size() == 3  # The conditional, then True and False.


def test_perturb_true_with_every_1_is_layer_sam_bit_for_bit():
  opt = optax.sgd(0.1, momentum=0.9)
  today = optax_lgm.layer_sam(opt, 0.3, k=2)
  tx = optax_lgm.layer_sam(opt, 0.3, k=2, schedule="every", every=1)
  step_today, step = host_step(today, loss_with_dot), host_step(tx, loss_with_dot)
  a = b = (init_params(), today.init(init_params()))
  for _ in range(5):
    a = step_today(*a)
    b = step(*b, perturb=True)
    chex.assert_trees_all_equal(b, a)
  assert int(b[1].perturbed_count) == 5


def test_traced_perturb_raises():
  tx = optax_lgm.layer_sam(optax.sgd(0.1), 0.3, k=2, every=2)
  params = init_params()

  def step(params, state, perturb):
    return tx.update(grad_fn(params), state, params, grad_fn=grad_fn, perturb=perturb)

  with pytest.raises(TypeError, match=r"perturb must be a Python bool.*"
                     r"static_argnames='perturb'"):  # fmt: skip
    jax.jit(step)(params, tx.init(params), True)
  with pytest.raises(TypeError, match=r"perturb=1 of type int"):
    step(params, tx.init(params), 1)


def test_host_programs_have_no_conditional():
  params, loss = _conv_net()
  tx = optax_lgm.layer_sam(optax.sgd(0.1), 0.1, k=1, every=2)
  step = host_step(tx, loss)
  state = tx.init(params)

  def conditionals(perturb):
    lowered = step.lower(params, state, perturb=perturb)
    compiled = lowered.compile().as_text()
    return lowered.as_text().count("stablehlo.case"), compiled.count("conditional(")

  assert conditionals(None) == (1, 1)  # The schedule's step: the check can fail.
  assert conditionals(True) == (0, 0)
  assert conditionals(False) == (0, 0)


# --------------------------------------------------------------------------
# An 8-device mesh and a 4x2 mesh (in a process of their own) equal one device.
# --------------------------------------------------------------------------

MESH_CASES = ("random", "adaptive", "every", "host")
"""The mesh runs: three in-graph schedules, and the host's decision."""


@pytest.fixture(scope="module", params=["8", "4x2"])
def mesh_run(request):
  """What the mesh run measured, as JSON: one process per mesh shape."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  result = subprocess.run(
    [sys.executable, __file__, "mesh", request.param],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    cwd=ROOT,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", MESH_CASES)
def test_mesh_run_equals_one_device(mesh_run, case):
  got = mesh_run[case]
  assert got["decisions"] == got["decisions_one_device"], got
  assert 0 < sum(got["decisions"]) < len(got["decisions"]), got
  assert got["close"] <= 1.0, (
    f"{case}: differs from one device by {got['close']:.3g} times the "
    "tolerance (rtol=1e-5, atol=1e-6)"
  )
  assert got["unreplicated"] == [], got


def _mesh_step(tx, loss, p, s, x, y, perturb=None):
  g_fn = jax.grad(lambda q, _: loss(q, x, y))
  updates, s = tx.update(g_fn(p, 0), s, p, grad_fn=g_fn, perturb=perturb)
  return optax.apply_updates(p, updates), s


def _closeness(got, want, rtol=1e-5, atol=1e-6) -> float:
  """The largest difference, in units of the tolerance (<= 1: close)."""
  ratios = [
    np.max(np.abs(np.asarray(a) - np.asarray(b)) / (atol + rtol * np.abs(b)))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))
    if np.size(b)
  ]
  return float(max(ratios))


def _mesh_check(shape: str) -> dict:
  """Scheduled runs with the batch over the mesh, and one device: both runs.

  ``shape`` is ``"8"`` (the batch over 8 devices) or ``"4x2"`` (the batch
  over 4 and the kernels' columns split over 2). The every-3 schedule is also
  run with the host's decision (``perturb`` static: two programs) on the mesh,
  against the conditional's run on one device.
  """
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  assert jax.device_count() == 8, jax.devices()
  params, x, y, loss = _mlp_problem(0, 64, (8, 16, 4), 0.3)
  if shape == "8":
    mesh = Mesh(np.array(jax.devices()), ("data",))
    kernel = P()
  else:
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    kernel = P(None, "model")
  data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

  def unreplicated(state) -> list[str]:
    """The state's leaves that are not replicated: all of them should be on the
    data mesh; on the 4x2 mesh, the statistics of the model-split kernels may
    follow their split, so only the scalars are checked there."""
    leaves = [x for x in jax.tree.leaves(state) if shape == "8" or x.ndim == 0]
    return [str(x.sharding) for x in leaves if not x.sharding.is_fully_replicated]

  placed = jax.device_put(params, NamedSharding(mesh, kernel))
  xs, ys = jax.device_put(x, data), jax.device_put(y, data)
  found = {}
  schedules = {
    "random": dict(schedule="random", probability=0.5, seed=4, skipped="orthogonal"),
    "adaptive": dict(schedule="adaptive", threshold=0.0, skipped="orthogonal"),
    "every": dict(every=3),
  }
  for name, kwargs in schedules.items():
    tx = optax_lgm.layer_sam(optax.sgd(0.1, momentum=0.9), 0.1, k=1, **kwargs)
    step = jax.jit(functools.partial(_mesh_step, tx, loss))
    one = (params, tx.init(params))
    many = (placed, jax.device_put(tx.init(params), replicated))
    decisions, decisions_one = [], []
    for _ in range(8):
      one, many = step(*one, x, y), step(*many, xs, ys)
      decisions.append(int(many[1].perturbed))
      decisions_one.append(int(one[1].perturbed))
    found[name] = {
      "decisions": decisions,
      "decisions_one_device": decisions_one,
      "close": _closeness(many, one),
      "unreplicated": unreplicated(many[1]),
    }
  # ``one`` and ``tx`` are still the every-3 run's.
  host = jax.jit(functools.partial(_mesh_step, tx, loss), static_argnames="perturb")
  many = (placed, jax.device_put(tx.init(params), replicated))
  decisions = []
  for i in range(8):
    many = host(*many, xs, ys, perturb=i % 3 == 0)
    decisions.append(int(many[1].perturbed))
  found["host"] = {
    "decisions": decisions,
    "decisions_one_device": found["every"]["decisions_one_device"],
    "close": _closeness(many, one),
    "unreplicated": unreplicated(many[1]),
  }
  return found


if __name__ == "__main__":
  if len(sys.argv) != 3 or sys.argv[1] != "mesh" or sys.argv[2] not in ("8", "4x2"):
    sys.exit(f"usage: {sys.argv[0]} mesh 8|4x2")
  print(json.dumps(_mesh_check(sys.argv[2])))


# --------------------------------------------------------------------------
# The benchmark runs (tiny; no timings checked).
# --------------------------------------------------------------------------


def test_benchmark_runs_tiny(tmp_path):
  out = tmp_path / "sam_schedule.json"
  proc = subprocess.run(
    [sys.executable, "-m", "benchmarks.sam_schedule", "--models", "cnn"]
    + ["--batch", "4", "--reps", "1", "--json", str(out)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  for label in ("SGD", "SAM", "SAM every=2", "SAM every=5", "SAM every=2 (host)"):
    assert f"| {label} |" in proc.stdout, proc.stdout
  assert "- every=5 (host) <= 1.25x SGD: " in proc.stdout, proc.stdout
  result = json.loads(out.read_text())["results"]["cnn"]
  assert result["ratio_to_sgd"]["SGD"] == 1.0
  assert set(result["per_step_s"]) == {
    "SGD",
    "SAM",
    "SAM every=2",
    "every=2, perturbed step",
    "every=2, skipped step",
    "SAM every=5",
    "SAM every=2 (host)",
    "SAM every=5 (host)",
  }
  assert len(result["targets"]) == 4
  assert all(isinstance(t["met"], bool) for t in result["targets"].values())
