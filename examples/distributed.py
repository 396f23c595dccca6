"""Devices and hosts for `examples.train`: the mesh, the batches, XLA's settings.

The step runs on a one-axis ``"data"`` mesh (`make_mesh`): each batch is split
over the devices of the axis (`shard_batch`), the model and optimizer states
are replicated, and XLA sums the gradients across devices. On one device this
changes nothing.

Several hosts: run the same command on every host with ``--distributed``,
which calls `initialize` (``jax.distributed.initialize()``) before JAX does
anything else. JAX finds the coordinator and the process ids on SLURM, Open
MPI, Kubernetes and Cloud TPU; elsewhere give them with
``--coordinator_address HOST:PORT --num_processes N --process_id I``. Use the
same ``--workdir`` on a shared file system. ``--mesh auto`` then spans the
devices of all hosts. Every host reads the whole global batch (the datasets
here are small and held in memory) and hands its own devices their rows with
``jax.make_array_from_callback``; for a large dataset, let each host read only
its slice and build the global batch with
``jax.make_array_from_process_local_data``. Only process 0 writes
``metrics.json``; orbax coordinates the checkpoint writes.

`enable_compilation_cache` keeps compiled programs in JAX's persistent cache;
`share_forward_passes` sets XLA:CPU's passes for SAM's two forward passes.
"""

import importlib.util
import os
import socket
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from examples.config import UsageError

YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
"""The XLA flag that turns off XLA:CPU's YNN fusions (see `initialize`)."""


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Joins the other hosts (``jax.distributed.initialize``), before any JAX work.

  On XLA:CPU, collectives between processes go through Gloo, and with XLA's
  YNN fusions on, ``layer_sam``'s dynamic step then computes some gradients
  a few percent off the one-process values (jax 0.10.2; see the sharding
  guide). So unless ``XLA_FLAGS`` already sets
  ``--xla_cpu_experimental_ynn_fusion_type``, the YNN fusions are turned off
  here, and one line says so. The flag only affects XLA:CPU.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_experimental_ynn_fusion_type" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {YNN_OFF}".strip()
    print(
      f"XLA:CPU with Gloo collectives: YNN fusions off (XLA_FLAGS+={YNN_OFF}) "
      "for exact multi-process results; see docs/guides/sharding.rst"
    )
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


def make_mesh(spec: str = "auto", batch_size: int | None = None) -> jax.sharding.Mesh:
  """Builds the one-axis ``"data"`` mesh of data-parallel training.

  Args:
    spec: ``"auto"`` for all devices (``jax.devices()``: those of every host),
      or ``"data=N"`` for the first ``N`` of them.
    batch_size: if given, checked to be a multiple of the number of devices.

  Returns:
    A mesh with the one axis ``"data"``.

  Raises:
    UsageError: (a ValueError) if ``spec`` is neither form, asks for more
      devices than there are, or ``batch_size`` does not split over them.

  Examples:
    >>> make_mesh("data=1").devices.shape
    (1,)
  """
  devices = jax.devices()
  if spec == "auto":
    size = len(devices)
  else:
    name, _, value = spec.partition("=")
    if name.strip() != "data" or not value.strip().isdigit():
      raise UsageError(f"mesh must be 'auto' or 'data=N', got mesh={spec!r}")
    size = int(value)
    if not 1 <= size <= len(devices):
      raise UsageError(
        f"mesh={spec!r} asks for {size} devices; there are {len(devices)}"
      )
  if batch_size is not None and batch_size % size:
    raise UsageError(
      f"batch_size={batch_size} is not a multiple of the {size} devices of "
      f"mesh={spec!r}; change --batch_size or --mesh"
    )
  return jax.make_mesh(
    (size,), ("data",), (jax.sharding.AxisType.Auto,), devices=devices[:size]
  )


def shard_batch(
  batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh
) -> dict[str, jax.Array]:
  """Gives each device of ``mesh`` its rows of a global batch."""
  sharding = NamedSharding(mesh, P("data"))
  return {
    key: jax.make_array_from_callback(
      value.shape, sharding, lambda index, value=value: value[index]
    )
    for key, value in batch.items()
  }


def replicate(tree, mesh: jax.sharding.Mesh):
  """Places a copy of ``tree`` on every device of ``mesh``."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def free_port() -> int:
  """A free TCP port of this host (for a coordinator address)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def enable_compilation_cache(path: str) -> None:
  """Keeps every compiled program in JAX's persistent cache at ``path`` ('': off).

  Programs of any compile time are kept (the CPU's take seconds, below JAX's
  default threshold), so a rerun or a resumed run loads them.
  """
  path = os.path.expanduser(path)
  if path and jax.config.jax_compilation_cache_dir != path:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()  # Takes the new directory from now on.


def share_forward_passes() -> None:
  """On a CPU-only host, lets XLA share SAM's two forward passes up to a layer.

  XLA:CPU's ``reshape-mover`` pass rewrites the BatchNorm arithmetic of the
  two passes differently, so a static ``layer_sam`` step computes its second
  forward pass again; without the pass the step that perturbs the output-side
  layers costs about an SGD step (other optimizers unchanged, on a ResNet-20).
  Takes effect only before JAX starts its backend; leaves an ``XLA_FLAGS``
  that already disables passes, or a host with a GPU or TPU plugin, alone.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "libtpu")
  if "xla_disable_hlo_passes" in flags or any(map(importlib.util.find_spec, plugins)):
    return
  os.environ["XLA_FLAGS"] = f"{flags} --xla_disable_hlo_passes=reshape-mover".strip()
