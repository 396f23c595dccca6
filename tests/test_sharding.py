"""Every transformation on a simulated 8-device mesh equals the one-device run.

``tests/_sharded_steps.py`` holds the checks: results against one device on
an 8-device data mesh and a 4x2 data x model mesh, the shardings of updates
and state, no host transfer in the step, and layer_sam's per-device
(m-sharpness) perturbation against the NumPy reference.

Each check is one test, run in a process of its own with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` so that the rest of the
suite keeps its single-device setup.
"""

import os
import pathlib
import subprocess
import sys

import pytest
from _sharded_steps import CHECKS

SCRIPT = pathlib.Path(__file__).with_name("_sharded_steps.py")


@pytest.mark.parametrize("check", list(CHECKS))
def test_sharded(check):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  result = subprocess.run(
    [sys.executable, str(SCRIPT), check],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  assert result.stdout == f"ok {check}\n", result.stdout
