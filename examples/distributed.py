"""Devices and hosts for `examples.train`: the mesh, the batches, XLA's settings.

The step runs on a one-axis ``"data"`` mesh: each batch is split over its
devices, the states are replicated, and XLA sums the gradients. On several
hosts (``--distributed``, one ``--workdir`` on a shared file system), every
host reads the whole global batch and hands its own devices their rows, only
process 0 writes ``metrics.json`` and orbax coordinates the checkpoint writes;
see docs/guides/sharding.rst.
"""

import importlib.util
import os
import socket
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from examples.config import UsageError

YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="  # XLA:CPU's YNN fusions off.


def _add_xla_flag(flag: str) -> None:
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def initialize(
  coordinator_address: str | None = None, num_processes: int | None = None,
  process_id: int | None = None,
) -> None:  # fmt: skip
  """Joins the other hosts (``jax.distributed.initialize``), before any JAX work.

  With XLA:CPU's collectives between processes (Gloo), XLA's YNN fusions make
  ``layer_sam``'s dynamic step a few percent off the one-process values, so
  they are turned off (with a line saying so) unless ``XLA_FLAGS`` sets them.
  """
  if "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    _add_xla_flag(YNN_OFF)
    print(
      f"XLA:CPU with Gloo collectives: YNN fusions off (XLA_FLAGS+={YNN_OFF}) "
      "for exact multi-process results; see docs/guides/sharding.rst"
    )
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


def make_mesh(spec: str = "auto", batch_size: int | None = None) -> Mesh:
  """The ``"data"`` mesh of ``spec``: ``"auto"`` (all devices) or ``"data=N"``.

  Raises `UsageError` if ``spec`` has neither form, asks for more devices than
  there are, or ``batch_size`` (where given) does not split over them.
  """
  devices = jax.devices()
  size = len(devices)
  if spec != "auto":
    name, _, value = spec.partition("=")
    if name.strip() != "data" or not value.strip().isdigit():
      raise UsageError(f"mesh must be 'auto' or 'data=N', got mesh={spec!r}")
    if not 1 <= int(value) <= size:
      raise UsageError(f"mesh={spec!r} asks for {int(value)} devices; there are {size}")
    size = int(value)
  if batch_size is not None and batch_size % size:
    raise UsageError(
      f"batch_size={batch_size} is not a multiple of the {size} devices of "
      f"mesh={spec!r}; change --batch_size or --mesh"
    )
  return jax.make_mesh(
    (size,), ("data",), (jax.sharding.AxisType.Auto,), devices=devices[:size]
  )


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Gives each device of ``mesh`` its rows of a global batch."""
  sharding = NamedSharding(mesh, P("data"))
  return {
    key: jax.make_array_from_callback(value.shape, sharding, value.__getitem__)
    for key, value in batch.items()
  }


def replicate(tree, mesh: Mesh):
  """Places a copy of ``tree`` on every device of ``mesh``."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def free_port() -> int:
  """A free TCP port of this host (for a coordinator address)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def enable_compilation_cache(path: str) -> None:
  """Keeps every compiled program in JAX's persistent cache at ``path`` ('': off)."""
  path = os.path.expanduser(path)
  if path and jax.config.jax_compilation_cache_dir != path:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # All.
    compilation_cache.reset_cache()  # Takes the new directory from now on.


def share_forward_passes() -> None:
  """On a CPU-only host, lets XLA share SAM's two forward passes up to a layer.

  XLA:CPU's ``reshape-mover`` pass rewrites the BatchNorm arithmetic of the two
  passes differently, so that the second is computed again. Call it before JAX
  starts its backend; an ``XLA_FLAGS`` that already disables passes is kept.
  """
  plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "libtpu")
  if "xla_disable_hlo_passes" in os.environ.get("XLA_FLAGS", "") or any(
    map(importlib.util.find_spec, plugins)
  ):
    return
  _add_xla_flag("--xla_disable_hlo_passes=reshape-mover")
