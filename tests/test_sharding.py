"""Every transformation on a simulated 8-device mesh equals the one-device run.

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
  for name in ("scale_by_lgm", "scale_by_lgm_temporal", "dgs", "dgs_layer_ema"):
    assert f"ok {name}" in result.stdout
