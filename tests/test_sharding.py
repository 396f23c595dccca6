"""Every transformation on a simulated 8-device mesh equals the one-device run.

``tests/_sharded_steps.py`` holds the checks: results against one device on
an 8-device data mesh and a 4x2 data x model mesh, the shardings of updates
and state, no host transfer in the step, and layer_sam's per-device
(m-sharpness) perturbation against the NumPy reference.

Each check is one test. Its steps run in a process of its own with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` so that the rest of the
suite keeps its single-device setup; that process prints what it measured as
JSON, and the assertions are made here.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from _sharded_steps import CHECKS

SCRIPT = pathlib.Path(__file__).with_name("_sharded_steps.py")
NO_PARAMS_LIKE_STATE = ("scale_by_lgm", "dgs")
"""The transformations whose state holds no params-shaped tree."""


def measure(check: str) -> dict:
  """Runs ``check`` on 8 simulated devices; returns what it measured."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  result = subprocess.run(
    [sys.executable, str(SCRIPT), check],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("check", list(CHECKS))
def test_sharded(check):
  got = measure(check)
  assert got["error"] is None, got["error"]
  for what, ratio in got["close"].items():
    assert ratio <= 1.0, (
      f"{check}, {what}: differs from the reference by {ratio:.3g} times the "
      "tolerance (rtol=1e-5, atol=1e-6)"
    )
  assert got["misplaced"] == [], f"{check}: arrays with the wrong sharding"
  if "params_like_state" in got and check not in NO_PARAMS_LIKE_STATE:
    assert got["params_like_state"] > 0, f"{check}: no params-like state"
  if "gap_to_global" in got:
    assert got["gap_to_global"] > 1e-3, "m-sharpness equals the global perturbation"
