"""XLA:CPU with Gloo collectives: a two-pass step differs from one process.

A pure-JAX reproduction attempt (no ``optax_lgm``) of the discrepancy of
``docs/guides/sharding.rst`` ("Several processes"): a small CNN trained with
``layer_sam``'s two-pass step written out (`_worker`), data-parallel on a
4-device ``"data"`` axis, three times in fresh processes: ``reference`` (one
process, no ``jax.distributed``), ``gloo, one process`` and ``gloo, two
processes`` (2 CPU devices each). It prints each parameter's largest absolute
and relative difference from the reference, then ``equal`` or ``DIFFERENT``
(relative tolerance 1e-5; the exit status is then 1). ``--xla_flags`` is added
to every run's ``XLA_FLAGS``, to try a workaround. This plain step agrees to
rounding; it is the starting point of a reduction.

Run: ``python -m benchmarks.multiprocess_repro [--steps 4] [--xla_flags FLAGS]``.
"""

import argparse
import functools
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

from examples import distributed

BATCH = 128  # Global: 32 images per device.
RHO, K, LEARNING_RATE, MOMENTUM = 0.05, 2, 0.05, 0.9  # The layers perturbed: K.
SHAPES = dict(
  conv1=(3, 3, 1, 32), conv2=(3, 3, 32, 64), dense=(2 * 2 * 64, 256), head=(256, 10)
)  # The kernel of each layer of the CNN (each has a bias too).


def _worker(args) -> None:
  """One process of a run: trains ``args.steps`` steps, saves the params."""
  import jax
  import jax.numpy as jnp
  from sklearn.datasets import load_digits

  if args.num_processes:
    jax.distributed.initialize(
      args.coordinator, num_processes=args.num_processes, process_id=args.process_id
    )
  assert jax.device_count() == 4, jax.devices()
  mesh = jax.make_mesh((4,), ("data",), (jax.sharding.AxisType.Auto,))

  def conv(x, layer):  # A 3x3 convolution, ReLU, then 2x2 average pooling.
    y = jax.lax.conv_general_dilated(
      x, layer["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    y = jax.nn.relu(y + layer["bias"])
    window = (1, 2, 2, 1)
    return jax.lax.reduce_window(y, 0.0, jax.lax.add, window, window, "VALID") / 4

  def dense(x, layer):
    return x @ layer["kernel"] + layer["bias"]

  def loss_fn(params, images, labels):
    x = conv(conv(images, params["conv1"]), params["conv2"])
    x = jax.nn.relu(dense(x.reshape(len(x), -1), params["dense"]))
    log_probs = jax.nn.log_softmax(dense(x, params["head"]))
    return -jnp.take_along_axis(log_probs, labels[:, None], axis=1).mean()

  @jax.jit
  def step(params, momentum, images, labels):
    # First pass; the layer norms; the K largest; the perturbation of those
    # alone, normalised over them; the second pass; SGD with momentum on the
    # second-pass gradient of the selected layers and the first-pass one of
    # the others.
    loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
    names = sorted(grads)
    norms = jnp.stack(
      [jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(grads[n]))) for n in names]
    )
    selected = jnp.zeros(len(names), bool).at[jax.lax.top_k(norms, K)[1]].set(True)
    scale = RHO / (jnp.sqrt(jnp.sum(jnp.where(selected, norms**2, 0.0))) + 1e-12)

    def per_layer(fn, *trees):  # fn(selected?, *leaves) on each layer's leaves.
      return {
        n: jax.tree.map(functools.partial(fn, selected[i]), *(t[n] for t in trees))
        for i, n in enumerate(names)
      }

    perturbed = per_layer(
      lambda s, w, g: w + jnp.where(s, scale * g, 0.0), params, grads
    )
    second = jax.grad(loss_fn)(perturbed, images, labels)
    used = per_layer(lambda s, a, b: jnp.where(s, a, b), second, grads)
    momentum = jax.tree.map(lambda m, g: MOMENTUM * m + g, momentum, used)
    params = jax.tree.map(lambda w, m: w - LEARNING_RATE * m, params, momentum)
    return params, momentum, loss

  digits = load_digits()
  all_images = ((digits.images / 16 - 0.3059) / 0.3762).astype(np.float32)[..., None]
  all_labels = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(all_labels))
  keys = jax.random.split(jax.random.key(0), len(SHAPES))
  params = {
    name: {
      "kernel": jax.random.normal(key, shape) / np.sqrt(np.prod(shape[:-1])),
      "bias": jnp.zeros(shape[-1]),
    }
    for (name, shape), key in zip(SHAPES.items(), keys)
  }
  params = distributed.replicate(params, mesh)
  momentum = jax.tree.map(jnp.zeros_like, params)
  for i in range(args.steps):
    rows = order[i * BATCH : (i + 1) * BATCH]
    batch = {"image": all_images[rows], "label": all_labels[rows]}
    batch = distributed.shard_batch(batch, mesh)
    params, momentum, _ = step(params, momentum, batch["image"], batch["label"])
  if jax.process_index() == 0:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    np.savez(args.out, **{jax.tree_util.keystr(k): np.asarray(x) for k, x in leaves})


def _run(name, out, processes, gloo, steps, xla_flags) -> None:
  """Starts the processes of one run and waits for them."""
  flags = f"--xla_force_host_platform_device_count={4 // processes} {xla_flags}"
  env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
  command = [sys.executable, "-m", "benchmarks.multiprocess_repro", "--worker"]
  command += [f"--steps={steps}", f"--out={out}"]
  if gloo:
    port = distributed.free_port()
    command += [f"--coordinator=localhost:{port}", f"--num_processes={processes}"]
  root = pathlib.Path(__file__).resolve().parents[1]
  output = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  children = [
    subprocess.Popen([*command, f"--process_id={i}"], env=env, cwd=root, **output)
    for i in range(processes)
  ]
  try:
    outputs = [child.communicate(timeout=600)[0] for child in children]
  finally:
    for child in children:
      child.kill()
  for child, output in zip(children, outputs):
    if child.returncode:
      raise RuntimeError(f"{name}: a process failed:\n{output}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--xla_flags", default="", help="added to XLA_FLAGS of every run")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--out", help=argparse.SUPPRESS)
  parser.add_argument("--coordinator", help=argparse.SUPPRESS)
  parser.add_argument("--num_processes", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--process_id", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    _worker(args)
    return 0

  runs = {"reference": (1, False), "gloo, one process": (1, True),
          "gloo, two processes": (2, True)}  # fmt: skip
  print(f"XLA_FLAGS extra: {args.xla_flags!r}; {args.steps} steps")
  different = False
  with tempfile.TemporaryDirectory() as tmp:
    results = {}
    for i, (name, (processes, gloo)) in enumerate(runs.items()):
      out = os.path.join(tmp, f"run{i}.npz")
      _run(name, out, processes, gloo, args.steps, args.xla_flags)
      results[name] = dict(np.load(out))
  reference = results.pop("reference")
  for name, params in results.items():
    print(f"{name}:")
    worst = 0.0
    for key, expected in reference.items():
      error = np.abs(params[key] - expected)
      rel = error.max() / max(np.abs(expected).max(), 1e-30)
      worst = max(worst, rel)
      print(f"  {key:24s} max abs {error.max():.3g}  max rel {rel:.3g}")
    ok = worst <= 1e-5
    different |= not ok
    verdict = "equal" if ok else "DIFFERENT"
    print(f"  -> {verdict} (largest relative difference {worst:.3g})")
  return int(different)


if __name__ == "__main__":
  sys.exit(main())
