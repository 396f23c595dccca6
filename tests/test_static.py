"""Tests of optax_lgm.StaticSelection, the host-side helper of static mode."""

import concurrent.futures
import functools
import json
import threading

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache

import optax_lgm

# Four one-leaf layers; the batch weights say how much each layer's loss term
# counts, so a test can decide which layers have the largest gradient norms.
PARAMS = {name: jnp.full((3,), 0.5 + 0.1 * i) for i, name in enumerate("abcd")}


def _loss(params, weights):
  return sum(w * jnp.sum(params[name] ** 2) for w, name in zip(weights, "abcd"))


def _make_step(tx, traces=None):
  @functools.partial(jax.jit, static_argnames="selection")
  def train_step(params, opt_state, weights, selection=None):
    if traces is not None:
      traces.append(selection)  # Runs once per compilation.
    grad_fn = jax.grad(lambda p, _: _loss(p, weights))
    updates, opt_state = tx.update(
      grad_fn(params, 0), opt_state, params, grad_fn=grad_fn, selection=selection
    )
    return optax.apply_updates(params, updates), opt_state

  return train_step


def _weights(step: int) -> jnp.ndarray:
  """Slowly drifting weights: the top layers change a few times."""
  w = np.array([1.0, 2.0, 3.0, 4.0]) + np.array([0.3, 0.1, -0.1, -0.3]) * step
  return jnp.asarray(np.abs(w) + 0.5, jnp.float32)


def _tx():
  return optax_lgm.layer_sam(optax.sgd(0.01), rho=0.05, k=2, norm_decay=0.5)


# Decisions at once and compiles in the foreground: the documented hand-written
# loop, which the switching rules below refine.
AT_ONCE = {"background": False, "patience": 1, "payoff": 0}


def test_same_results_as_the_hand_written_loop():
  tx = _tx()
  train_step = _make_step(tx)
  every, steps = 4, 21

  # The documented loop: dynamic step 0, then select_layers before step 1 and
  # before every multiple of `every` (margin 0: any better top-k is taken).
  params, opt_state, selection, used = PARAMS, tx.init(PARAMS), None, []
  for t in range(steps):
    if t == 1 or (t > 0 and t % every == 0):
      selection = optax_lgm.select_layers(opt_state)
    used.append(selection)
    params, opt_state = train_step(params, opt_state, _weights(t), selection=selection)

  helper = optax_lgm.StaticSelection(
    train_step, every=every, margin=0.0, max_compilations=100, **AT_ONCE
  )
  h_params, h_state = PARAMS, tx.init(PARAMS)
  h_used = []
  for t in range(steps):
    h_used.append(helper.selection)
    h_params, h_state = helper(h_params, h_state, _weights(t))

  assert h_used == used
  assert len(set(used)) > 2, "the test problem should change its selection"
  chex.assert_trees_all_equal(h_params, params)
  chex.assert_trees_all_equal(h_state, opt_state)
  assert helper.step == steps


def test_a_change_takes_effect_at_the_documented_step():
  tx = _tx()
  helper = optax_lgm.StaticSelection(
    _make_step(tx), every=5, margin=0.0, max_compilations=100, **AT_ONCE
  )
  params, opt_state = PARAMS, tx.init(PARAMS)
  used = []
  for t in range(31):
    used.append(helper.selection)
    params, opt_state = helper(params, opt_state, _weights(t))
  assert used[0] is None
  for t in range(1, len(used)):
    if used[t] != used[t - 1]:
      assert t == 1 or t % 5 == 0, f"selection changed before step {t}"
  # `changes` lists exactly the steps at which the selection used changed.
  expected = [(t, used[t]) for t in range(1, len(used)) if used[t] != used[t - 1]]
  assert helper.changes == expected
  assert len(expected) >= 2


def test_compilations_are_bounded():
  tx = _tx()

  def run(max_compilations):
    traces = []
    helper = optax_lgm.StaticSelection(
      _make_step(tx, traces),
      every=1,
      margin=0.0,
      max_compilations=max_compilations,
      **AT_ONCE,
    )
    params, opt_state = PARAMS, tx.init(PARAMS)
    for t in range(40):
      # The dominant layers rotate every few steps.
      w = np.ones(4)
      w[(t // 3) % 4] = 8.0
      w[(t // 3 + 1) % 4] = 6.0
      params, opt_state = helper(params, opt_state, jnp.asarray(w, jnp.float32))
    return helper, traces

  unbounded, traces = run(100)
  assert unbounded.compilations > 3  # Without the bound the problem needs more.
  assert len(traces) == unbounded.compilations

  bounded, traces = run(3)
  assert bounded.compilations == 3
  assert len(traces) == 3, traces  # Traced (so compiled) once per selection.
  assert set(bounded.selections) == set(traces)


def _state_with_norms(norms, current_k=2):
  tx = optax_lgm.layer_sam(optax.sgd(0.1), k=current_k)
  state = tx.init(PARAMS)
  selected = np.zeros(4, np.int32)
  selected[:current_k] = 1
  return state._replace(
    grad_norm_avg=jnp.asarray(norms, jnp.float32),
    grad_norm=jnp.asarray(norms, jnp.float32),
    selected=jnp.asarray(selected),
  )


@pytest.mark.parametrize(
  ("second_norms", "margin", "switches"),
  [
    # Current (0, 1); the candidate is (2, 3). s(C) = 2 * 2.5^2 = 12.5.
    ([2.5, 2.5, 2.52, 2.52], 0.05, False),  # s(T) = 12.70 <= 1.05 * 12.5 = 13.125
    ([2.5, 2.5, 2.52, 2.52], 0.0, True),  # any strictly better candidate
    ([2.5, 2.5, 2.6, 2.6], 0.05, True),  # s(T) = 13.52 > 13.125
    ([2.5, 2.5, 2.6, 2.6], 0.1, False),  # 13.52 <= 1.1 * 12.5 = 13.75
  ],
)
def test_switching_rule_has_a_margin(second_norms, margin, switches):
  states = iter(
    [_state_with_norms([3.0, 2.0, 1.0, 0.5]), _state_with_norms(second_norms)]
  )

  def step(state, selection=None):
    return state

  helper = optax_lgm.StaticSelection(step, every=1, margin=margin, **AT_ONCE)
  helper(next(states))  # Step 0: dynamic; selects (0, 1) for step 1.
  assert helper.selection == (0, 1)
  helper(next(states))
  assert helper.selection == ((2, 3) if switches else (0, 1))
  assert helper.changes == [(1, (0, 1))] + ([(2, (2, 3))] if switches else [])


def test_full_cache_falls_back_to_the_best_compiled_selection():
  norm_sequence = [
    [3.0, 2.0, 1.0, 0.5],  # -> (0, 1)
    [1.0, 3.0, 2.0, 0.5],  # -> (1, 2): third distinct selection, the bound
    [3.0, 0.1, 0.1, 3.1],  # -> (0, 3) is new: best compiled is (0, 1)
  ]
  states = iter([_state_with_norms(n) for n in norm_sequence])

  def step(state, selection=None):
    return state

  helper = optax_lgm.StaticSelection(
    step, every=1, margin=0.0, max_compilations=3, **AT_ONCE
  )
  for _ in norm_sequence:
    helper(next(states))
  assert helper.selections == (None, (0, 1), (1, 2))
  assert helper.selection == (0, 1)
  assert helper.compilations == 3


def test_state_dict_resumes_the_same_run():
  tx = _tx()
  train_step = _make_step(tx)

  def run(steps, helper, params, opt_state, start=0):
    for t in range(start, steps):
      params, opt_state = helper(params, opt_state, _weights(t))
    return params, opt_state

  whole = optax_lgm.StaticSelection(train_step, every=3, **AT_ONCE)
  params, opt_state = run(20, whole, PARAMS, tx.init(PARAMS))

  first = optax_lgm.StaticSelection(train_step, every=3, **AT_ONCE)
  mid_params, mid_state = run(11, first, PARAMS, tx.init(PARAMS))
  saved = first.state_dict()
  # The host state must survive a JSON round trip (metrics, checkpoints).

  resumed = optax_lgm.StaticSelection(train_step, every=3, **AT_ONCE)
  resumed.load_state_dict(json.loads(json.dumps(saved)))
  params2, opt_state2 = run(20, resumed, mid_params, mid_state, start=11)

  chex.assert_trees_all_equal(params2, params)
  assert resumed.changes == whole.changes
  seconds = ("compile_seconds_critical", "compile_seconds_background", "step_seconds")
  untimed = lambda log: {k: v for k, v in log.items() if k not in seconds}  # noqa: E731
  assert untimed(resumed.log()) == untimed(whole.log())


def test_with_nnx_jit_and_an_nnx_optimizer():
  class Mlp(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(4, 8, rngs=rngs)
      self.l2 = nnx.Linear(8, 8, rngs=rngs)
      self.l3 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      return self.l3(jax.nn.relu(self.l2(jax.nn.relu(self.l1(x)))))

  def loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  traces = []

  @nnx.jit(static_argnames="selection")
  def train_step(model, optimizer, x, y, selection=None):
    traces.append(selection)
    graphdef, params = nnx.split(model, nnx.Param)

    def grad_fn(p, _):
      return jax.grad(lambda q: loss(nnx.merge(graphdef, q), x, y))(p)

    value, grads = nnx.value_and_grad(loss)(model, x, y)
    optimizer.update(model, grads, grad_fn=grad_fn, selection=selection)
    return value

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=16))

  def make():
    model = Mlp(nnx.Rngs(0))
    tx = optax_lgm.layer_sam(optax.sgd(0.1), k=1, layers="module")
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  model, optimizer = make()
  helper = optax_lgm.StaticSelection(train_step, every=2, **AT_ONCE)
  for _ in range(6):
    helper(model, optimizer, x, y)
  assert helper.selection is not None and len(helper.selection) == 1
  assert helper.compilations == len(traces) >= 2

  # The same run by hand, with the selection the helper used at each step.
  ref_model, ref_optimizer = make()
  selection = None
  for t in range(6):
    if t == 1 or (t > 0 and t % 2 == 0):
      selection = optax_lgm.select_layers(ref_optimizer.opt_state)
    train_step(ref_model, ref_optimizer, x, y, selection=selection)
  chex.assert_trees_all_equal(
    nnx.state(model, nnx.Param), nnx.state(ref_model, nnx.Param)
  )


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    ({"every": 0}, ValueError, "every=0"),
    ({"every": 2.5}, ValueError, "every=2.5"),
    ({"max_compilations": 1}, ValueError, "max_compilations=1"),
    ({"margin": -0.1}, ValueError, "margin=-0.1"),
    ({"margin": "big"}, TypeError, "margin='big'"),
    ({"k": 0}, ValueError, "k=0"),
    ({"by": "median"}, ValueError, "by='median'"),
  ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
  with pytest.raises(error, match=match):
    optax_lgm.StaticSelection(lambda selection=None: None, **kwargs)


def test_missing_state_and_selection_argument_are_reported():
  helper = optax_lgm.StaticSelection(lambda x, selection=None: x)
  with pytest.raises(ValueError, match="no LayerSamState"):
    helper(jnp.zeros(3))
  with pytest.raises(TypeError, match="selection="):
    helper(jnp.zeros(3), selection=(0,))
  with pytest.raises(TypeError, match="step_fn"):
    optax_lgm.StaticSelection(None)


def test_a_skipped_first_step_keeps_dynamic_mode_until_a_finite_step():
  tx = optax.apply_if_finite(_tx(), max_consecutive_errors=5)
  helper = optax_lgm.StaticSelection(_make_step(tx), every=4, **AT_ONCE)
  params, opt_state = PARAMS, tx.init(PARAMS)
  used = []
  for t in range(6):
    used.append(helper.selection)
    weights = jnp.full((4,), jnp.nan) if t == 0 else _weights(t)
    params, opt_state = helper(params, opt_state, weights)
  # Step 0 was not finite, so step 1 still runs dynamically; it selects.
  assert used[:2] == [None, None]
  assert used[2] is not None and helper.changes[0] == (2, used[2])
  chex.assert_tree_all_finite(params)


# Background compilation, the start selection and the switching rules.


class _GatedCompile:
  """A ``compile_fn`` that returns only once the test releases it."""

  def __init__(self, fail: bool = False):
    self.release = threading.Event()
    self.calls: list = []
    self.fail = fail

  def __call__(self, selection, args, kwargs):
    self.calls.append(selection)
    assert self.release.wait(timeout=120), "the test never released the compile"
    if self.fail:
      raise RuntimeError("the compile failed")
    return selection


def _compile_threads(before=()):
  """The compile threads alive, except those in ``before`` (other tests')."""
  return [
    t
    for t in threading.enumerate()
    if t.name.startswith("optax_lgm-compile") and t not in before
  ]


def test_background_compiles_give_the_foreground_run_bit_for_bit():
  tx = _tx()
  train_step = _make_step(tx)
  helper = optax_lgm.StaticSelection(
    train_step, every=4, margin=0.0, max_compilations=100, patience=1, payoff=0
  )
  params, opt_state, used = PARAMS, tx.init(PARAMS), []
  for t in range(21):
    used.append(helper.selection)
    params, opt_state = helper(params, opt_state, _weights(t))
    helper.wait()  # Ready before the next step: a fixed schedule.
  helper.close()
  assert len(set(used)) > 2 and helper.log()["compile_seconds_background"] > 0

  # The same schedule of selections, each compiled on its first call.
  ref_params, ref_state = PARAMS, tx.init(PARAMS)
  for t, selection in enumerate(used):
    ref_params, ref_state = train_step(
      ref_params, ref_state, _weights(t), selection=selection
    )
  chex.assert_trees_all_equal(params, ref_params)
  chex.assert_trees_all_equal(opt_state, ref_state)


def test_compiles_are_counted_and_each_program_is_compiled_once():
  tx = _tx()
  train_step = _make_step(tx)
  compiles = []

  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(duration)

  helper = optax_lgm.StaticSelection(
    train_step, every=4, margin=0.0, patience=1, payoff=0, max_compilations=100
  )
  # Strongly typed params: the first step then takes the types of the later
  # ones, and jit compiles one program per selection.
  params = {k: jnp.asarray(np.asarray(v), jnp.float32) for k, v in PARAMS.items()}
  opt_state = tx.init(params)
  weights = [_weights(t) for t in range(21)]
  # Loads from JAX's persistent cache (which a trainer test in this process
  # may have turned on) are not compiles: count with the cache off.
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for t in range(21):
      params, opt_state = helper(params, opt_state, weights[t])
      helper.wait()
    jax.block_until_ready(params)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()
    helper.close()
  # Every background compile is the one the step's next call used: no
  # program was compiled twice.
  assert helper.compilations >= 3
  assert len(compiles) == helper.compilations


def test_a_slow_compile_never_blocks_a_step():
  tx = _tx()
  gate = _GatedCompile()
  before = _compile_threads()
  helper = optax_lgm.StaticSelection(
    _make_step(tx), every=3, margin=0.0, patience=1, payoff=0, compile_fn=gate
  )
  params, opt_state = PARAMS, tx.init(PARAMS)
  for t in range(7):  # Step 0 is dynamic; the compile starts after it.
    params, opt_state = helper(params, opt_state, _weights(t))
  assert gate.calls == [helper.compiling] and not gate.release.is_set()
  assert helper.selection is None and helper.changes == []  # Not used: not ready.
  assert helper.step == 7  # Seven steps ran while the compile hung.
  gate.release.set()
  helper.wait()
  assert helper.compiling is None
  assert helper.selection == gate.calls[0] and helper.changes == [(7, gate.calls[0])]
  params, opt_state = helper(params, opt_state, _weights(7))
  assert helper.selections == (None, gate.calls[0])
  helper.close()
  assert not _compile_threads(before)


def test_the_compile_thread_ends_with_an_exception():
  tx = _tx()
  gate = _GatedCompile()
  train_step = _make_step(tx)

  def step(params, opt_state, weights, selection=None):
    if helper.step == 3:
      raise KeyboardInterrupt  # The user stops the run.
    return train_step(params, opt_state, weights, selection=selection)

  before = _compile_threads()
  helper = optax_lgm.StaticSelection(step, every=2, patience=1, compile_fn=gate)
  params, opt_state = PARAMS, tx.init(PARAMS)
  with pytest.raises(KeyboardInterrupt):
    for t in range(5):
      params, opt_state = helper(params, opt_state, _weights(t))
  (thread,) = _compile_threads(before)  # The compile was in flight.
  gate.release.set()
  thread.join(timeout=60)
  assert not thread.is_alive()


def test_a_failed_compile_is_raised_at_the_next_step():
  tx = _tx()
  gate = _GatedCompile(fail=True)
  before = _compile_threads()
  helper = optax_lgm.StaticSelection(
    _make_step(tx), every=2, patience=1, compile_fn=gate
  )
  params, opt_state = helper(PARAMS, tx.init(PARAMS), _weights(0))
  params, opt_state = helper(params, opt_state, _weights(1))  # Submits it.
  gate.release.set()
  concurrent.futures.wait([helper._pending[1]])
  with pytest.raises(RuntimeError, match="the compile failed"):
    helper(params, opt_state, _weights(2))
  for thread in _compile_threads(before):  # Shut down: ends after its task.
    thread.join(timeout=60)
  assert not _compile_threads(before)


def test_resume_with_a_compile_in_flight_equals_an_uninterrupted_run():
  tx = _tx()
  train_step = _make_step(tx)
  release_at, stop_at, steps = 9, 6, 20

  def run(helper, gate, params, opt_state, start, stop):
    for t in range(start, stop):
      if t == release_at:
        gate.release.set()
      if t >= release_at:  # From here on, each compile is ready by the next step.
        helper.wait()
      params, opt_state = helper(params, opt_state, _weights(t))
    return params, opt_state

  def make(gate):
    return optax_lgm.StaticSelection(
      train_step, every=2, margin=0.0, patience=1, payoff=0, compile_fn=gate
    )

  gate = _GatedCompile()
  whole = make(gate)
  params, _ = run(whole, gate, PARAMS, tx.init(PARAMS), 0, steps)

  gate = _GatedCompile()
  first = make(gate)
  mid_params, mid_state = run(first, gate, PARAMS, tx.init(PARAMS), 0, stop_at)
  saved = json.loads(json.dumps(first.state_dict()))
  assert saved["compiling"] is not None  # The checkpoint has a compile in flight.
  gate.release.set()
  first.close()

  gate = _GatedCompile()
  resumed = make(gate)
  resumed.load_state_dict(saved)
  params2, _ = run(resumed, gate, mid_params, mid_state, stop_at, steps)
  assert gate.calls[0] == tuple(saved["compiling"])  # Started again.
  chex.assert_trees_all_equal(params2, params)
  assert resumed.changes == whole.changes and whole.changes[0][0] == release_at
  whole.close()
  resumed.close()


def _stub_run(norms_sequence, **kwargs):
  """Runs a step that returns the given layer norms; the selections used."""
  states = iter([_state_with_norms(n) for n in norms_sequence])

  def step(state, selection=None):
    return next(states)

  helper = optax_lgm.StaticSelection(step, every=1, margin=0.0, **kwargs)
  used = []
  for _ in norms_sequence:
    used.append(helper.selection)
    helper(_state_with_norms([1.0, 1.0, 1.0, 1.0]))
  return helper, used


@pytest.mark.parametrize(
  ("pattern", "patience", "switches"),
  [
    ("WW", 2, True),  # Two consecutive wins.
    ("W", 2, False),  # One win is not enough.
    ("WLW", 2, False),  # A loss in between starts the count again.
    ("WLWW", 2, True),
    ("WW", 3, False),
    ("W", 1, True),
  ],
)
def test_hysteresis_needs_consecutive_wins(pattern, patience, switches):
  # Step 0 (dynamic) selects (0, 1), leaving dynamic mode at once; then the
  # candidate (2, 3) wins (W) or loses (L) against it.
  first, win, lose = [3.0, 2.0, 1.0, 0.5], [1.0, 1.0, 3.0, 3.0], [3.0, 2.0, 1.0, 0.5]
  sequence = [first] + [win if c == "W" else lose for c in pattern]
  helper, used = _stub_run(
    sequence, background=False, payoff=0, patience=patience, max_compilations=10
  )
  assert used[1] == (0, 1)
  assert (helper.selection == (2, 3)) is switches
  if switches:  # The switch comes right after the last needed win.
    assert helper.changes[-1] == (len(pattern) + 1, (2, 3))


class _FakeClock:
  def __init__(self):
    self.now = 0.0

  def perf_counter(self):
    return self.now


@pytest.mark.parametrize(("total_steps", "switches"), [(26, True), (25, False)])
def test_payoff_rule_at_its_boundary(monkeypatch, total_steps, switches):
  clock = _FakeClock()
  monkeypatch.setattr(optax_lgm._static, "time", clock)
  first, later = [3.0, 2.0, 1.0, 0.5], [1.0, 1.0, 3.0, 3.0]
  norms = iter([first, first, first, later, later])
  seen = set()

  def step(state, selection=None):
    clock.now += 1.0  # A step takes 1 s ...
    if selection not in seen:  # ... and a compile 10 s.
      seen.add(selection)
      clock.now += 10.0
    return _state_with_norms(next(norms))

  helper = optax_lgm.StaticSelection(
    step,
    every=1,
    margin=0.0,
    patience=1,
    payoff=2.0,
    background=False,
    total_steps=total_steps,
  )
  for _ in range(4):
    helper(_state_with_norms([1.0] * 4))
  # Steps 2 and 3 ran (0, 1) after its compile: the interval between their
  # calls, 1 s, is its step time. The compiles took 11 s each (their call,
  # step included). After step 3, steps left * 1 s must reach 2 * 11 s:
  # 26 - 4 = 22 pays, 25 - 4 = 21 does not.
  assert helper.expected_compile_seconds() == 11.0
  assert (helper.selection == (2, 3)) is switches
  assert helper.step == 4


def test_a_start_selection_skips_the_dynamic_compile():
  tx = _tx()
  traces = []
  helper = optax_lgm.StaticSelection(
    _make_step(tx, traces),
    every=4,
    start=("c", "d"),
    margin=0.0,
    patience=1,
    payoff=0,
  )
  params, opt_state = PARAMS, tx.init(PARAMS)
  for t in range(20):
    params, opt_state = helper(params, opt_state, _weights(t))
    helper.wait()
  helper.close()
  assert traces[0] == (2, 3) and None not in traces
  assert helper.selections[0] == (2, 3)
  assert len(helper.selections) > 1  # It moved on to the top-k selection.


def test_a_step_that_does_not_return_its_state_is_reported():
  tx = _tx()
  train_step = _make_step(tx)

  def loss_only(params, opt_state, weights, selection=None):
    return train_step(params, opt_state, weights, selection=selection)[0]

  helper = optax_lgm.StaticSelection(loss_only, every=2, background=False)
  opt_state = tx.init(PARAMS)
  with pytest.raises(ValueError, match="Return the new optimizer state"):
    for t in range(4):
      helper(PARAMS, opt_state, _weights(t))


def test_an_nnx_step_under_jax_jit_is_reported():
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(
    model, optax_lgm.layer_sam(optax.sgd(0.1), k=1), wrt=nnx.Param
  )
  x = jnp.ones((8, 4))

  @functools.partial(jax.jit, static_argnames="selection")
  def train_step(model, optimizer, x, selection=None):
    graphdef, _ = nnx.split(model, nnx.Param)

    def loss(m):
      return jnp.mean(m(x) ** 2)

    def grad_fn(p, _):
      return jax.grad(lambda q: loss(nnx.merge(graphdef, q)))(p)

    grads = nnx.grad(loss)(model)
    optimizer.update(model, grads, grad_fn=grad_fn, selection=selection)

  helper = optax_lgm.StaticSelection(train_step, every=2, background=False)
  with pytest.raises(
    ValueError, match=r"nnx\.jit\(\.\.\., static_argnames='selection'\)"
  ):
    for _ in range(4):
      helper(model, optimizer, x)


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    ({"patience": 0}, ValueError, "patience=0"),
    ({"payoff": -1.0}, ValueError, "payoff=-1.0"),
    ({"horizon": 0}, ValueError, "horizon=0"),
    ({"total_steps": -1}, ValueError, "total_steps=-1"),
    ({"start": "head"}, ValueError, "start='head'"),
    ({"start": ()}, ValueError, r"start=\(\)"),
    ({"compile_fn": 3}, TypeError, "compile_fn=3"),
  ],
)
def test_bad_rule_arguments_name_the_argument(kwargs, error, match):
  with pytest.raises(error, match=match):
    optax_lgm.StaticSelection(jax.jit(lambda selection=None: None), **kwargs)


def test_a_start_naming_an_unknown_layer_is_reported():
  tx = _tx()
  helper = optax_lgm.StaticSelection(_make_step(tx), start=("head",))
  with pytest.raises(ValueError, match="'head'"):
    helper(PARAMS, tx.init(PARAMS), _weights(0))
