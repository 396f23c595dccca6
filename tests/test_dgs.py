"""Tests of Dynamic Gradient Scaling against a NumPy reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_lgm

KEYS = ("a", "b", "c")


def grad_sequence(steps=4, seed=0):
  rng = np.random.default_rng(seed)
  return [
    {
      "a": rng.normal(0.0, 1e-2, (4, 3)),
      "b": rng.normal(0.0, 1.0, (5,)),
      "c": rng.normal(0.0, 10.0, (2, 2)),
    }
    for _ in range(steps)
  ]


def dgs_reference(
  grads_seq, *, beta, sigma, gamma, reduction, importance_decay, denominator="sum"
):
  """Plain NumPy (float64) DGS, step by step."""
  importance = None
  outputs = []
  for t, grads in enumerate(grads_seq):
    g = {k: np.asarray(v, np.float64) for k, v in grads.items()}
    if importance_decay is None:
      importance = {k: np.abs(v) for k, v in g.items()}
    elif t == 0:
      importance = {k: np.abs(v) for k, v in g.items()}
    else:
      d = importance_decay
      importance = {k: d * importance[k] + (1 - d) * np.abs(g[k]) for k in g}
    weighted = {k: gamma[k] * importance[k] for k in g}
    mean = denominator == "mean"
    if reduction == "global":
      total = sum(np.sum(w) for w in weighted.values())
      if mean:
        total /= sum(w.size for w in weighted.values())
      denom = {k: sigma + total for k in g}
    elif reduction == "layer":
      denom = {
        k: sigma + (np.mean(weighted[k]) if mean else np.sum(weighted[k])) for k in g
      }
    else:
      denom = {k: sigma + weighted[k] for k in g}
    outputs.append({k: beta * g[k] / denom[k] for k in g})
  return outputs


def run_dgs(grads_seq, **kwargs):
  tx = optax_lgm.scale_by_dgs(**kwargs)

  def as_f32(t):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)

  state = tx.init(as_f32(grads_seq[0]))
  update = jax.jit(tx.update)
  out = []
  for grads in grads_seq:
    updates, state = update(as_f32(grads), state)
    out.append(updates)
  return out


@pytest.mark.parametrize("reduction", ["global", "layer", "element"])
@pytest.mark.parametrize("importance_decay", [None, 0.9])
@pytest.mark.parametrize("tree_gamma", [False, True])
@pytest.mark.parametrize("denominator", ["sum", "mean"])
def test_matches_numpy_reference(reduction, importance_decay, tree_gamma, denominator):
  grads_seq = grad_sequence()
  if tree_gamma:
    rng = np.random.default_rng(1)
    gamma = {k: rng.uniform(0.5, 2.0, np.shape(grads_seq[0][k])) for k in KEYS}
  else:
    gamma = {k: 0.7 for k in KEYS}
  tx_gamma = (
    jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), gamma) if tree_gamma else 0.7
  )
  kwargs = dict(
    beta=2.0,
    sigma=1e-3,
    reduction=reduction,
    importance_decay=importance_decay,
    denominator=denominator,
  )
  got = run_dgs(grads_seq, gamma=tx_gamma, **kwargs)
  want = dgs_reference(grads_seq, gamma=gamma, **kwargs)
  for g, w in zip(got, want):
    chex.assert_trees_all_close(g, w, rtol=2e-5, atol=1e-8)


def test_global_is_the_papers_equation_spelled_out():
  grads = {"w": jnp.array([3.0, -1.0]), "v": jnp.array([[2.0, 2.0]])}
  tx = optax_lgm.scale_by_dgs(beta=0.5, sigma=1.0)
  updates, _ = tx.update(grads, tx.init(grads))
  denom = 1.0 + 3 + 1 + 2 + 2
  chex.assert_trees_all_close(updates, jax.tree.map(lambda g: 0.5 * g / denom, grads))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-4, 1e4))
def test_global_keeps_the_gradient_direction(seed, scale):
  grads = jax.tree.map(
    lambda x: jnp.asarray(x * scale, jnp.float32), grad_sequence(1, seed)[0]
  )
  updates = _global_update(grads)
  g = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads)])
  u = np.concatenate([np.ravel(x) for x in jax.tree.leaves(updates)])
  cosine = g @ u / (np.linalg.norm(g) * np.linalg.norm(u))
  np.testing.assert_allclose(cosine, 1.0, rtol=1e-5)
  # The L1 norm of the update is beta (sigma is negligible here).
  np.testing.assert_allclose(np.sum(np.abs(u)), 1.0, rtol=1e-3)


@jax.jit
def _global_update(grads):
  tx = optax_lgm.scale_by_dgs()
  return tx.update(grads, tx.init(grads))[0]


def test_element_is_sign_descent():
  grads = {"w": jnp.array([3.0, -1e-3, 0.5, -20.0])}
  tx = optax_lgm.scale_by_dgs(reduction="element", sigma=1e-12)
  updates, _ = tx.update(grads, tx.init(grads))
  np.testing.assert_allclose(updates["w"], np.sign(grads["w"]), rtol=1e-6)


@pytest.mark.parametrize("reduction", ["global", "layer", "element"])
def test_zero_and_constant_gradients_are_finite(reduction):
  grads = {"zero": jnp.zeros((3,)), "const": jnp.full((4,), 2.0), "one": jnp.ones(1)}
  tx = optax_lgm.scale_by_dgs(reduction=reduction, importance_decay=0.5)
  state = tx.init(grads)
  for _ in range(2):
    updates, state = tx.update(grads, state)
    chex.assert_tree_all_finite((updates, state))
  np.testing.assert_array_equal(updates["zero"], 0.0)


def test_mask_excludes_leaves_from_sum():
  grads = {"w": jnp.array([3.0, 1.0]), "bias": jnp.array([100.0, 100.0])}
  tx = optax_lgm.scale_by_dgs(mask={"w": True, "bias": False})
  updates, _ = tx.update(grads, tx.init(grads))
  np.testing.assert_allclose(updates["w"], [0.75, 0.25], rtol=1e-6)
  np.testing.assert_array_equal(updates["bias"], grads["bias"])


def test_dgs_equals_its_chain():
  params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
  a = optax_lgm.dgs(2.0, momentum=0.9, reduction="layer")
  b = optax.chain(
    optax_lgm.scale_by_dgs(reduction="layer", denominator="mean"),
    optax.trace(0.9),
    optax.scale_by_learning_rate(2.0),
  )
  sa, sb = a.init(params), b.init(params)
  for g in grad_sequence(3):
    g = {
      "w": jnp.asarray(g["a"][:3, :2], jnp.float32),
      "b": jnp.asarray(g["b"][:2], jnp.float32),
    }
    ua, sa = a.update(g, sa, params)
    ub, sb = b.update(g, sb, params)
    chex.assert_trees_all_close(ua, ub)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(reduction="row"), "reduction='row'"),
    (dict(sigma=-1.0), "sigma"),
    (dict(importance_decay=1.0), "importance_decay"),
    (dict(importance_decay=-0.5), "importance_decay"),
    (dict(layers="blocks"), "layers='blocks'"),
  ],
)
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optax_lgm.scale_by_dgs(**kwargs)


def test_gamma_tree_that_does_not_match_params_raises_at_init():
  tx = optax_lgm.scale_by_dgs(gamma={"w": 1.0})
  with pytest.raises(ValueError, match="gamma"):
    tx.init({"w": jnp.ones(2), "b": jnp.ones(2)})
