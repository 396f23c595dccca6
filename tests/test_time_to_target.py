"""Tests of the time-to-target benchmark's rule and of the selection budget."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lgm
from benchmarks import layer_sam_speed, time_to_target


def _run(seconds, step, final):
  return {
    "seconds_to_target": seconds,
    "steps_to_target": step,
    "final_accuracy": final,
    "train_seconds": 40.0,
    "compilations": 2,
    "curve": [{"step": 20, "seconds": 20.0, "accuracy": 0.5}] * 2,
  }


def test_summary_takes_the_median_and_reports_misses():
  args = types.SimpleNamespace(eval_every=20, target=0.97)
  runs = {
    "sam": [_run(30.0, 200, 0.98), _run(10.0, 100, 0.99), _run(20.0, 160, 0.97)],
    "sgd": [_run(5.0, 60, 0.96), _run(None, None, 0.95), _run(7.0, 80, 0.97)],
  }
  rows = time_to_target.summarize(runs, args)
  assert rows["sam"]["median_seconds"] == 20.0
  assert rows["sam"]["median_steps"] == 160
  # A seed that missed the target: no median time (it would flatter the rest).
  assert rows["sgd"]["median_seconds"] is None
  assert rows["sgd"]["seconds"] == [5.0, None, 7.0]
  table = time_to_target.markdown(rows, args)
  sam_row = next(line for line in table.splitlines() if line.startswith("| sam "))
  sgd_row = next(line for line in table.splitlines() if line.startswith("| sgd "))
  assert "| 20.0 | 1.00 | 3/3 | 160 |" in sam_row
  assert "| — | — | 2/3 |" in sgd_row


def test_budget_mask_keeps_only_the_named_layers_as_candidates():
  params = {
    "blocks": {
      7: {"conv1": {"kernel": jnp.ones((3, 3))}},
      8: {"conv1": {"kernel": jnp.ones((3, 3))}},
    },
    "head": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
    "conv": {"kernel": jnp.ones((3, 3))},
  }
  mask = layer_sam_speed.budget_mask("blocks/8,head")(params)
  assert mask["blocks"][8]["conv1"]["kernel"] and mask["head"]["kernel"]
  assert not mask["blocks"][7]["conv1"]["kernel"] and not mask["conv"]["kernel"]
  names = optax_lgm.layer_names(
    params, "module", mask=layer_sam_speed.budget_mask("blocks/8,head")
  )
  assert set(names) == {"blocks/8/conv1", "head"}

  # layer_sam with the budget: the layers outside it are never perturbed, even
  # when their gradients are the largest.
  tx = optax_lgm.layer_sam(
    optax.sgd(0.1), k=1, mask=layer_sam_speed.budget_mask(("blocks/8", "head"))
  )

  def loss(p, _=None):
    return 100 * jnp.sum(p["conv"]["kernel"] ** 2) + jnp.sum(p["head"]["kernel"] ** 2)

  grads = jax.grad(loss)(params)
  _, state = tx.update(grads, tx.init(params), params, grad_fn=jax.grad(loss))
  selected = dict(zip(names, np.asarray(state.selected)))
  assert selected == {"blocks/8/conv1": 0, "head": 1}


def test_unknown_contender_is_a_usage_error(capsys):
  with pytest.raises(SystemExit) as exit_info:
    time_to_target.main(["--contenders", "sgd,adamw"])
  assert exit_info.value.code == 2
  assert "adamw" in capsys.readouterr().err
