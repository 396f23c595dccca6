"""Tests of optax_lgm.StaticSelection, the host-side helper of static mode."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

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
    train_step, every=every, margin=0.0, max_compilations=100
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
    _make_step(tx), every=5, margin=0.0, max_compilations=100
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
      _make_step(tx, traces), every=1, margin=0.0, max_compilations=max_compilations
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

  helper = optax_lgm.StaticSelection(step, every=1, margin=margin)
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

  helper = optax_lgm.StaticSelection(step, every=1, margin=0.0, max_compilations=3)
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

  whole = optax_lgm.StaticSelection(train_step, every=3)
  params, opt_state = run(20, whole, PARAMS, tx.init(PARAMS))

  first = optax_lgm.StaticSelection(train_step, every=3)
  mid_params, mid_state = run(11, first, PARAMS, tx.init(PARAMS))
  saved = first.state_dict()
  # The host state must survive a JSON round trip (metrics, checkpoints).

  resumed = optax_lgm.StaticSelection(train_step, every=3)
  resumed.load_state_dict(json.loads(json.dumps(saved)))
  params2, opt_state2 = run(20, resumed, mid_params, mid_state, start=11)

  chex.assert_trees_all_equal(params2, params)
  assert resumed.changes == whole.changes
  assert resumed.log() == whole.log()


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
  helper = optax_lgm.StaticSelection(train_step, every=2)
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
  helper = optax_lgm.StaticSelection(_make_step(tx), every=4)
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
