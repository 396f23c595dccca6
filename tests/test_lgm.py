"""Tests of Layerwise Gradient Modulation against a NumPy reference."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_lgm

NO_CLIP = dict(min_scale=None, max_scale=None)


def grad_sequence(steps=4, seed=0):
  """Gradients of three layers of clearly different scales, per step."""
  rng = np.random.default_rng(seed)
  return [
    {
      "conv": {"kernel": rng.normal(0.0, 1e-3, (3, 3, 2)), "bias": rng.normal(size=2)},
      "head": {"kernel": rng.normal(0.5, 2.0, (4, 3)), "bias": rng.normal(size=3)},
    }
    for _ in range(steps)
  ]


def lgm_reference(
  grads_seq,
  groups,
  *,
  beta,
  eps,
  power,
  normalize,
  variance,
  min_scale=None,
  max_scale=None,
):
  """Plain NumPy (float64) LGM, step by step. ``groups``: layer -> leaf paths."""
  alpha = mu = None
  outputs = []
  for t, grads in enumerate(grads_seq):
    flat = {
      path: np.asarray(grads[path[0]][path[1]], np.float64)
      for g in groups
      for path in g
    }
    var = []
    for g in groups:
      entries = np.concatenate([flat[p].ravel() for p in g])
      if variance == "temporal" and t > 0:
        prev = np.concatenate([mu[p].ravel() for p in g])
        var.append(np.mean((entries - prev) ** 2))
      else:
        var.append(np.var(entries))
    if variance == "temporal":
      mu = {p: flat[p] if t == 0 else beta * mu[p] + (1 - beta) * flat[p] for p in flat}
    observed = (np.asarray(var) + eps) ** (-power)
    alpha = observed if t == 0 else beta * alpha + (1 - beta) * observed
    if normalize == "mean":
      scale = alpha / alpha.mean()
    elif normalize == "geometric":
      scale = alpha / np.exp(np.mean(np.log(alpha)))
    else:
      scale = alpha
    if min_scale is not None or max_scale is not None:
      scale = np.clip(scale, min_scale, max_scale)
    out = {k: {} for k in grads}
    for s, g in zip(scale, groups):
      for p in g:
        out[p[0]][p[1]] = s * flat[p]
    outputs.append((out, alpha, scale))
  return outputs


LEAF_GROUPS = [
  [("conv", "bias")],
  [("conv", "kernel")],
  [("head", "bias")],
  [("head", "kernel")],
]
MODULE_GROUPS = [
  [("conv", "bias"), ("conv", "kernel")],
  [("head", "bias"), ("head", "kernel")],
]


def run_lgm(grads_seq, **kwargs):
  tx = optax_lgm.scale_by_lgm(**kwargs)
  params = jax.tree.map(jnp.zeros_like, grads_seq[0])
  state = tx.init(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params))
  update = jax.jit(tx.update)
  out = []
  for grads in grads_seq:
    updates, state = update(
      jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads), state
    )
    out.append((updates, state))
  return out


def assert_matches(got, want, rtol=2e-4):
  for (updates, state), (ref_updates, ref_alpha, ref_scale) in zip(got, want):
    np.testing.assert_allclose(state.alpha, ref_alpha, rtol=rtol)
    np.testing.assert_allclose(state.scale, ref_scale, rtol=rtol)
    chex.assert_trees_all_close(updates, ref_updates, rtol=rtol, atol=1e-7)


def test_literal_recurrence_exact():
  """The paper's rule: seeded with the first observation, updated alpha applied."""
  grads_seq = grad_sequence()
  kwargs = dict(beta=0.9, eps=1e-8, power=1.0, normalize=None, variance="spatial")
  got = run_lgm(grads_seq, **kwargs, **NO_CLIP)
  assert_matches(got, lgm_reference(grads_seq, LEAF_GROUPS, **kwargs))
  # Spelled out for the first two steps of one layer.
  g0 = grads_seq[0]["head"]["kernel"]
  g1 = grads_seq[1]["head"]["kernel"]
  a0 = 1 / (np.var(g0) + 1e-8)
  a1 = 0.9 * a0 + 0.1 / (np.var(g1) + 1e-8)
  np.testing.assert_allclose(got[1][0]["head"]["kernel"], a1 * g1, rtol=2e-4)


@pytest.mark.parametrize(
  "variance,normalize,power",
  list(
    itertools.product(["spatial", "temporal"], [None, "mean", "geometric"], [0.5, 1.0])
  ),
)
def test_matches_numpy_reference(variance, normalize, power):
  grads_seq = grad_sequence()
  kwargs = dict(
    beta=0.8, eps=1e-12, power=power, normalize=normalize, variance=variance
  )
  got = run_lgm(grads_seq, **kwargs, **NO_CLIP)
  assert_matches(got, lgm_reference(grads_seq, LEAF_GROUPS, **kwargs))


def test_matches_reference_module_layers_with_clipping():
  grads_seq = grad_sequence()
  kwargs = dict(
    beta=0.5,
    eps=1e-16,
    power=0.5,
    normalize="geometric",
    variance="spatial",
    min_scale=0.5,
    max_scale=2.0,
  )
  got = run_lgm(grads_seq, layers="module", **kwargs)
  want = lgm_reference(grads_seq, MODULE_GROUPS, **kwargs)
  assert_matches(got, want)
  assert np.all(np.asarray(got[-1][1].scale) <= 2.0)


def test_default_scales_have_unit_geometric_mean():
  got = run_lgm(grad_sequence(), **NO_CLIP)
  _, state = got[-1]
  np.testing.assert_allclose(np.exp(np.mean(np.log(state.scale))), 1.0, rtol=1e-5)


_INVARIANT_TX = optax_lgm.scale_by_lgm(power=0.5, normalize=None, eps=0.0, **NO_CLIP)


@jax.jit
def _invariant_run(grads_seq):
  state = _INVARIANT_TX.init(grads_seq[0])
  out = []
  for grads in grads_seq:
    updates, state = _INVARIANT_TX.update(grads, state)
    out.append(updates)
  return out


@settings(max_examples=20, deadline=None)
@given(c=st.floats(1e-3, 1e3), seed=st.integers(0, 100))
def test_power_half_is_invariant_to_rescaling_one_layer(c, seed):
  """With power=0.5 and no normalisation, g -> c*g leaves the update unchanged."""
  grads_seq = grad_sequence(3, seed)
  scaled = [
    {**g, "head": {**g["head"], "kernel": c * g["head"]["kernel"]}} for g in grads_seq
  ]

  def as_f32(seq):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), seq)

  chex.assert_trees_all_close(
    _invariant_run(as_f32(grads_seq)),
    _invariant_run(as_f32(scaled)),
    rtol=1e-3,
    atol=1e-6,
  )


@pytest.mark.parametrize(
  "kwargs", [{}, dict(power=1.0, normalize=None, **NO_CLIP), dict(variance="temporal")]
)
def test_zero_constant_and_size_one_gradients_give_finite_updates(kwargs):
  grads = {
    "zero": jnp.zeros((3, 3)),
    "const": jnp.full((4,), 2.0),
    "one": jnp.ones(1),
    "normal": jnp.arange(5.0),
  }
  tx = optax_lgm.scale_by_lgm(**kwargs)
  state = tx.init(grads)
  for _ in range(3):
    updates, state = tx.update(grads, state)
    chex.assert_tree_all_finite((updates, state))
  np.testing.assert_array_equal(updates["one"], grads["one"])
  np.testing.assert_array_equal(updates["zero"], 0.0)


def test_mask_passes_leaves_through():
  grads = grad_sequence(1)[0]
  grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads)
  mask = jax.tree.map(lambda x: x.ndim > 1, grads)
  tx = optax_lgm.scale_by_lgm(mask=mask)
  updates, state = tx.update(grads, tx.init(grads))
  np.testing.assert_array_equal(updates["conv"]["bias"], grads["conv"]["bias"])
  assert state.names.names == ("conv/kernel", "head/kernel")


def test_layer_stats_by_name():
  grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grad_sequence(1)[0])
  tx = optax.chain(optax_lgm.scale_by_lgm(), optax.sgd(0.1))
  _, state = tx.update(grads, tx.init(grads), grads)
  stats = optax_lgm.layer_stats(state)
  assert set(stats["lgm_scale"]) == {
    "conv/bias",
    "conv/kernel",
    "head/bias",
    "head/kernel",
  }
  # The tiny conv kernel gradient gets the largest scale.
  assert max(stats["lgm_scale"], key=stats["lgm_scale"].get) == "conv/kernel"


def test_lgm_equals_its_chain():
  grads_seq = [
    jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g) for g in grad_sequence()
  ]
  params = jax.tree.map(jnp.ones_like, grads_seq[0])
  a = optax_lgm.lgm(0.1, momentum=0.9, weight_decay=1e-2)
  b = optax.chain(
    optax_lgm.scale_by_lgm(),
    optax.add_decayed_weights(1e-2),
    optax.trace(0.9),
    optax.scale_by_learning_rate(0.1),
  )
  sa, sb = a.init(params), b.init(params)
  for g in grads_seq:
    ua, sa = a.update(g, sa, params)
    ub, sb = b.update(g, sb, params)
    chex.assert_trees_all_close(ua, ub)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(beta=-0.1), "beta"),
    (dict(beta=1.5), "beta"),
    (dict(eps=-1.0), "eps"),
    (dict(power=-1.0), "power"),
    (dict(variance="spectral"), "variance='spectral'"),
    (dict(normalize="median"), "normalize='median'"),
    (dict(layers="block"), "layers='block'"),
    (dict(layer_axes=-1), "layer_axes"),
    (dict(max_scale=0.0), "max_scale"),
  ],
)
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optax_lgm.scale_by_lgm(**kwargs)


def test_layer_axes_larger_than_rank_raises_at_init():
  tx = optax_lgm.scale_by_lgm(layer_axes=2)
  with pytest.raises(ValueError, match="layer_axes=2"):
    tx.init({"w": jnp.ones((2, 2)), "b": jnp.ones(2)})


def test_stacked_layers_match_separate_layers():
  """layer_axes=1 on a stacked leaf gives the per-slice statistics."""
  rng = np.random.default_rng(0)
  stacked = {
    "w": jnp.asarray(
      rng.normal(size=(3, 4, 5)) * np.array([1, 10, 100])[:, None, None], jnp.float32
    )
  }
  separate = {f"w{i}": stacked["w"][i] for i in range(3)}
  ua, sa = optax_lgm.scale_by_lgm(layer_axes=1).update(
    stacked, optax_lgm.scale_by_lgm(layer_axes=1).init(stacked)
  )
  ub, sb = optax_lgm.scale_by_lgm().update(
    separate, optax_lgm.scale_by_lgm().init(separate)
  )
  np.testing.assert_allclose(sa.scale, sb.scale, rtol=1e-5)
  for i in range(3):
    np.testing.assert_allclose(ua["w"][i], ub[f"w{i}"], rtol=1e-5)


def test_layer_stats_looks_inside_layer_sam():
  params = {"a": jnp.ones((3, 2)), "b": jnp.arange(4.0)}
  tx = optax_lgm.layer_sam(optax_lgm.lgm(0.1), rho=0.05, k=1)
  _, state = tx.update(params, tx.init(params), params, grad_fn=lambda p, _: p)
  stats = optax_lgm.layer_stats(state)
  assert set(stats["lgm_scale"]) == {"a", "b"}
  assert "sam_selected_count" in stats
