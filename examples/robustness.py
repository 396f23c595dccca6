"""Robustness evaluation: adversarial attacks and noise on the pixel scale.

Public API::

  fgsm(model, images, labels, eps) -> images
  pgd(model, images, labels, eps, *, step_size=None, steps=10, key=None)
      -> images
  gaussian_noise(images, sigma, key) -> images
  accuracy(model, images, labels, *, batch_size=256) -> float
  evaluate_robustness(model, images, labels, *, key, eps_list=(8/255, 0.1),
                      sigmas=(0.04, 0.06, 0.08, 0.09, 0.10), pgd_steps=10,
                      batch_size=256, progress=False) -> dict[str, float]

Images are ``float32 [B, H, W, C]`` on the [0, 1] pixel scale, labels ``int
[B]``, as `examples.input_pipeline` makes them; the models of
`examples.models` normalise inside ``__call__``, so perturbations are added to
pixels and the result is clipped to [0, 1]. Attacks take the L-infinity
gradient-sign steps of the cross-entropy
(``optax.softmax_cross_entropy_with_integer_labels``).

The model is always run in eval mode (BatchNorm on its running statistics) on
a copy made inside the jitted functions; the caller's model and its mode are
left as they are. Each function is compiled once per model structure and mode,
input shape and (for PGD) number of steps; ``eps``, ``sigma`` and
``step_size`` are traced, so sweeping them does not recompile.

Report PGD beside FGSM: FGSM alone is fooled by gradient masking.
"""

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx
from jax.typing import ArrayLike


def _logits(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
  """Applies the model given by ``(graphdef, state)`` in eval mode."""
  model = nnx.merge(graphdef, state)
  model.eval()
  return model(images)


def _input_gradient(
  graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array, labels: jax.Array
) -> jax.Array:
  """Gradient of the summed cross-entropy with respect to the images."""

  def loss_fn(x):
    logits = _logits(graphdef, state, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()

  return jax.grad(loss_fn)(images)


@functools.partial(jax.jit, static_argnums=0)
def _fgsm(graphdef, state, images, labels, eps):
  gradient = _input_gradient(graphdef, state, images, labels)
  return jnp.clip(images + eps * jnp.sign(gradient), 0.0, 1.0)


@functools.partial(jax.jit, static_argnums=0, static_argnames="steps")
def _pgd(graphdef, state, images, labels, eps, step_size, start, *, steps):
  def project(x):
    return jnp.clip(jnp.clip(x, images - eps, images + eps), 0.0, 1.0)

  # Unrolled, not a fori_loop: XLA:CPU runs the convolutions of a loop body
  # as naive loops (ResNet-20, 256 images, 5 steps: 10.8 s a call looped,
  # 1.8 s unrolled).
  x = project(images + start)
  for _ in range(steps):
    gradient = _input_gradient(graphdef, state, x, labels)
    x = project(x + step_size * jnp.sign(gradient))
  return x


@jax.jit
def _uniform_start(key, images, eps):
  return jax.random.uniform(key, images.shape, images.dtype, -eps, eps)


@functools.partial(jax.jit, static_argnums=0)
def _num_correct(graphdef, state, images, labels, valid):
  predictions = jnp.argmax(_logits(graphdef, state, images), axis=-1)
  return jnp.sum((predictions == labels) & valid)


def fgsm(
  model: nnx.Module, images: jax.Array, labels: jax.Array, eps: float
) -> jax.Array:
  r"""Fast gradient sign method (Goodfellow et al., 2015).

  .. math::
    x' = \operatorname{clip}_{[0, 1]}(x + \epsilon \operatorname{sign}
    \nabla_x \ell(f(x), y))

  Args:
    model: a classifier of [0, 1] pixels; run in eval mode.
    images: ``float32 [B, H, W, C]`` on [0, 1].
    labels: integer labels ``[B]``.
    eps: L-infinity size of the perturbation, on the pixel scale.

  Returns:
    The perturbed images, on [0, 1] and within ``eps`` of ``images``.

  References:
    Goodfellow et al., `Explaining and Harnessing Adversarial Examples
    <https://arxiv.org/abs/1412.6572>`_, 2015.
  """
  graphdef, state = nnx.split(model)
  return _fgsm(graphdef, state, images, labels, eps)


def pgd(
  model: nnx.Module,
  images: jax.Array,
  labels: jax.Array,
  eps: float,
  *,
  step_size: float | None = None,
  steps: int = 10,
  key: jax.Array | None = None,
) -> jax.Array:
  r"""Projected gradient descent in the L-infinity ball (Madry et al., 2018).

  Starting from ``images`` (or a uniform random point of the ``eps`` ball
  when ``key`` is given), ``steps`` times

  .. math::
    x \leftarrow \Pi_{[0, 1] \cap B_\infty(x_0, \epsilon)}
    \left(x + \alpha \operatorname{sign} \nabla_x \ell(f(x), y)\right)

  Args:
    model: a classifier of [0, 1] pixels; run in eval mode.
    images: ``float32 [B, H, W, C]`` on [0, 1].
    labels: integer labels ``[B]``.
    eps: L-infinity radius of the ball, on the pixel scale.
    step_size: the step :math:`\alpha`; ``None`` for ``2.5 * eps / steps``
      (Madry et al.), which can walk across the ball and back.
    steps: number of gradient steps.
    key: PRNG key of the random start; ``None`` starts at ``images``.

  Returns:
    The perturbed images, on [0, 1] and within ``eps`` of ``images``.

  References:
    Madry et al., `Towards Deep Learning Models Resistant to Adversarial
    Attacks <https://arxiv.org/abs/1706.06083>`_, 2018.
  """
  graphdef, state = nnx.split(model)
  return _pgd_batch(
    graphdef, state, images, labels, key, eps=eps, steps=steps, step_size=step_size
  )


@jax.jit
def gaussian_noise(images: jax.Array, sigma: float, key: jax.Array) -> jax.Array:
  """Adds Gaussian noise of standard deviation ``sigma`` and clips to [0, 1].

  The noise of CIFAR-10-C (Hendrycks and Dietterich, 2019) at severities 1 to 5
  has ``sigma`` 0.04, 0.06, 0.08, 0.09 and 0.10 on the pixel scale.

  Args:
    images: ``float32 [B, H, W, C]`` on [0, 1].
    sigma: standard deviation of the noise, on the pixel scale.
    key: PRNG key.

  Returns:
    The noisy images, on [0, 1].
  """
  noise = jax.random.normal(key, images.shape, images.dtype)
  return jnp.clip(images + sigma * noise, 0.0, 1.0)


def accuracy(
  model: nnx.Module,
  images: ArrayLike,
  labels: ArrayLike,
  *,
  batch_size: int = 256,
) -> float:
  """Top-1 accuracy of a model in eval mode.

  Args:
    model: a classifier of [0, 1] pixels.
    images: ``float32 [N, H, W, C]`` on [0, 1].
    labels: integer labels ``[N]``.
    batch_size: number of images per forward pass.

  Returns:
    The fraction of images classified correctly.
  """
  graphdef, state = nnx.split(model)
  return _accuracy(graphdef, state, images, labels, batch_size)


def evaluate_robustness(
  model: nnx.Module,
  images: ArrayLike,
  labels: ArrayLike,
  *,
  key: jax.Array,
  eps_list: Sequence[float] = (8 / 255, 0.1),
  sigmas: Sequence[float] = (0.04, 0.06, 0.08, 0.09, 0.10),
  pgd_steps: int = 10,
  batch_size: int = 256,
  progress: bool = False,
) -> dict[str, float]:
  """Accuracy on clean, adversarial and noisy versions of a test set.

  Keys of the result: ``'clean'``; ``'fgsm@EPS'`` and ``'pgd@EPS'`` for each
  ``eps`` (PGD with ``pgd_steps`` steps of size ``2.5 * eps / pgd_steps`` from
  a random start); ``'noise@SIGMA'`` for each ``sigma`` (the same noise draws,
  scaled, for every ``sigma``). The numbers are written with
  ``format(x, '.3g')``: 8/255 gives ``'fgsm@0.0314'``, 0.1 gives ``'pgd@0.1'``.

  Args:
    model: a classifier of [0, 1] pixels; run in eval mode.
    images: ``float32 [N, H, W, C]`` on [0, 1].
    labels: integer labels ``[N]``.
    key: PRNG key of the PGD starts and the noise.
    eps_list: L-infinity sizes of the attacks, on the pixel scale.
    sigmas: standard deviations of the Gaussian noise, on the pixel scale.
    pgd_steps: number of PGD steps.
    batch_size: number of images per attack and forward pass; the last batch
      is padded, so that every batch has the same shape and compiles once.
    progress: whether to show a progress bar over the evaluations.

  Returns:
    A flat ``{name: accuracy}`` dict of Python floats.
  """
  graphdef, state = nnx.split(model)
  pgd_key, noise_key = jax.random.split(key)
  evaluations = [("clean", None, None)]
  for eps in eps_list:
    evaluations += [
      (f"fgsm@{eps:.3g}", functools.partial(_fgsm_batch, eps=eps), None),
      (
        f"pgd@{eps:.3g}",
        functools.partial(_pgd_batch, eps=eps, steps=pgd_steps),
        pgd_key,
      ),
    ]
  for sigma in sigmas:
    evaluations.append(
      (f"noise@{sigma:.3g}", functools.partial(_noise_batch, sigma=sigma), noise_key)
    )
  return {
    name: _accuracy(graphdef, state, images, labels, batch_size, perturb, key)
    for name, perturb, key in tqdm.tqdm(
      evaluations, desc="robustness", disable=not progress
    )
  }


# A perturbation of one batch: (graphdef, state, images, labels, key) -> images.
_Perturbation = Callable[
  [nnx.GraphDef, nnx.State, jax.Array, jax.Array, jax.Array | None], jax.Array
]


def _fgsm_batch(graphdef, state, images, labels, key, *, eps):
  del key  # Deterministic.
  return _fgsm(graphdef, state, images, labels, eps)


def _pgd_batch(graphdef, state, images, labels, key, *, eps, steps, step_size=None):
  if step_size is None:
    step_size = 2.5 * eps / steps
  images = jnp.asarray(images)
  if key is None:
    start = jnp.zeros_like(images)
  else:
    start = _uniform_start(key, images, eps)
  return _pgd(graphdef, state, images, labels, eps, step_size, start, steps=steps)


def _noise_batch(graphdef, state, images, labels, key, *, sigma):
  del graphdef, state, labels  # The noise does not look at the model.
  return gaussian_noise(images, sigma, key)


def _accuracy(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  images: ArrayLike,
  labels: ArrayLike,
  batch_size: int,
  perturb: _Perturbation | None = None,
  key: jax.Array | None = None,
) -> float:
  """Accuracy on ``perturb``-ed images, batch by batch.

  Every batch is padded to ``batch_size`` rows, which are not counted. Batch
  ``i`` is perturbed with ``fold_in(key, i)``.
  """
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  num_examples = len(labels)
  batch_size = min(batch_size, num_examples)
  correct = 0
  for i, start in enumerate(range(0, num_examples, batch_size)):
    x = images[start : start + batch_size]
    y = labels[start : start + batch_size]
    valid = np.arange(batch_size) < len(y)
    padding = batch_size - len(y)
    x = np.pad(x, [(0, padding)] + [(0, 0)] * (x.ndim - 1))
    y = np.pad(y, (0, padding))
    if perturb is not None:
      batch_key = None if key is None else jax.random.fold_in(key, i)
      x = perturb(graphdef, state, x, y, batch_key)
    correct += int(_num_correct(graphdef, state, x, y, valid))
  return correct / num_examples
