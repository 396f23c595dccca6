"""Every transformation on a simulated 8-device mesh equals the one-device run.

``tests/_sharded_steps.py`` lists the checks: results against one device on
an 8-device data mesh and a 4x2 data x model mesh, the shardings of updates
and state, no host transfer in the step, and layer_sam's per-device
(m-sharpness) perturbation against a NumPy reference.

The checks run in a subprocess (``tests/_sharded_steps.py``) with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` so that the rest of the
suite keeps its single-device setup.
"""

import os
import pathlib
import subprocess
import sys


def test_sharded_steps_match_single_device():
  script = pathlib.Path(__file__).with_name("_sharded_steps.py")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  result = subprocess.run(
    [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0, result.stdout + result.stderr
  checks = [
    "scale_by_lgm",
    "scale_by_lgm_temporal",
    "dgs",
    "dgs_layer_ema",
    "layer_sam",
    "layer_sam_static",
    "sam_keep_top_k_layers",
    "unpinned_layout dgs_layer_ema",
    "unpinned_layout layer_sam",
    "m_sharpness",
  ]
  for name in checks:
    assert f"ok {name}\n" in result.stdout, (name, result.stdout)
