"""Robustness evaluation: adversarial attacks and noise on the pixel scale.

Images are ``float32 [B, H, W, C]`` on [0, 1] and labels ``int [B]``; the models
of `examples.models` standardise inside ``__call__``, so perturbations are added
to pixels and the result is clipped to [0, 1]. Attacks take L-infinity
gradient-sign steps of the cross-entropy; report PGD beside FGSM, which gradient
masking fools. The model runs in eval mode on a copy made inside the jitted
functions; ``eps``, ``sigma`` and ``step_size`` are traced (no recompilation).
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx
from jax.typing import ArrayLike


def _logits(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
  model = nnx.merge(graphdef, state)
  model.eval()
  return model(images)


@functools.partial(jax.jit, static_argnums=0, static_argnames="steps")
def _pgd(graphdef, state, images, labels, key, eps, step_size, *, steps):
  def loss_fn(x):  # Summed over the batch: each image's own gradient.
    logits = _logits(graphdef, state, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()

  def project(x):
    return jnp.clip(jnp.clip(x, images - eps, images + eps), 0.0, 1.0)

  x = images
  if key is not None:  # A uniform random start in the ball.
    x = x + jax.random.uniform(key, images.shape, images.dtype, -eps, eps)
  x = project(x)
  # Unrolled, not a fori_loop: XLA:CPU runs the convolutions of a loop body as
  # naive loops, several times slower.
  for _ in range(steps):
    x = project(x + step_size * jnp.sign(jax.grad(loss_fn)(x)))
  return x


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

  References:
    Goodfellow et al., `Explaining and Harnessing Adversarial Examples
    <https://arxiv.org/abs/1412.6572>`_, 2015.
  """
  return pgd(model, images, labels, eps, step_size=eps, steps=1)


def pgd(
  model: nnx.Module, images: jax.Array, labels: jax.Array, eps: float, *,
  step_size: float | None = None, steps: int = 10, key: jax.Array | None = None,
) -> jax.Array:  # fmt: skip
  r"""Projected gradient descent in the L-infinity ball (Madry et al., 2018).

  From ``images`` (or a uniform random point of the ball when ``key`` is given),
  ``steps`` times (``step_size`` :math:`\alpha`; ``None``: ``2.5 * eps / steps``)

  .. math::
    x \leftarrow \Pi_{[0, 1] \cap B_\infty(x_0, \epsilon)}
    \left(x + \alpha \operatorname{sign} \nabla_x \ell(f(x), y)\right)

  References:
    Madry et al., `Towards Deep Learning Models Resistant to Adversarial
    Attacks <https://arxiv.org/abs/1706.06083>`_, 2018.
  """
  if step_size is None:
    step_size = 2.5 * eps / steps
  graphdef, state = nnx.split(model)
  return _pgd(graphdef, state, images, labels, key, eps, step_size, steps=steps)


@jax.jit
def gaussian_noise(images: jax.Array, sigma: float, key: jax.Array) -> jax.Array:
  """Adds Gaussian noise of standard deviation ``sigma`` and clips to [0, 1]."""
  noise = jax.random.normal(key, images.shape, images.dtype)
  return jnp.clip(images + sigma * noise, 0.0, 1.0)


def accuracy(
  model: nnx.Module, images: ArrayLike, labels: ArrayLike, *, batch_size: int = 256
) -> float:
  """Top-1 accuracy of a model in eval mode, ``batch_size`` images at a time."""
  return _accuracy(model, images, labels, batch_size)


def evaluate_robustness(
  model: nnx.Module, images: ArrayLike, labels: ArrayLike, *, key: jax.Array,
  eps_list: Sequence[float] = (8 / 255, 0.1),
  sigmas: Sequence[float] = (0.04, 0.06, 0.08, 0.09, 0.10),
  pgd_steps: int = 10, batch_size: int = 256, progress: bool = False,
) -> dict[str, float]:  # fmt: skip
  """Accuracy on clean, adversarial and noisy versions of a test set.

  Returns ``{name: accuracy}``: ``'clean'``; ``'fgsm@EPS'`` and ``'pgd@EPS'``
  (from a random start) for each of ``eps_list``; ``'noise@SIGMA'`` for each of
  ``sigmas`` (the same draws, scaled; the defaults: CIFAR-10-C's severities 1 to
  5); names formatted with ``'.3g'``. ``key`` seeds the PGD starts and the
  noise. The last batch is padded, so that every batch compiles once.
  """
  pgd_key, noise_key = jax.random.split(key)
  evaluations = [("clean", None, None)]
  for eps in eps_list:
    fgsm_eps = functools.partial(pgd, model, eps=eps, step_size=eps, steps=1)
    pgd_eps = functools.partial(pgd, model, eps=eps, steps=pgd_steps)
    evaluations.append((f"fgsm@{eps:.3g}", fgsm_eps, None))
    evaluations.append((f"pgd@{eps:.3g}", pgd_eps, pgd_key))
  for sigma in sigmas:
    noise = functools.partial(_noise, sigma=sigma)
    evaluations.append((f"noise@{sigma:.3g}", noise, noise_key))
  bar = tqdm.tqdm(evaluations, desc="robustness", disable=not progress)
  return {
    name: _accuracy(model, images, labels, batch_size, perturb, key)
    for name, perturb, key in bar
  }


def _noise(images, labels, *, key, sigma):
  del labels  # The noise does not look at them.
  return gaussian_noise(images, sigma, key)


def _accuracy(model, images, labels, batch_size, perturb=None, key=None):
  """Accuracy on ``perturb(images, labels, key=fold_in(key, i))`` for batch ``i``."""
  graphdef, state = nnx.split(model)
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  num_examples = len(labels)
  batch_size = min(batch_size, num_examples)
  correct = 0
  for i, start in enumerate(range(0, num_examples, batch_size)):
    x = images[start : start + batch_size]
    y = labels[start : start + batch_size]
    valid = np.arange(batch_size) < len(y)  # The padding is not counted.
    padding = batch_size - len(y)
    x = np.pad(x, [(0, padding)] + [(0, 0)] * (x.ndim - 1))
    y = np.pad(y, (0, padding))
    if perturb is not None:
      batch_key = None if key is None else jax.random.fold_in(key, i)
      x = perturb(x, y, key=batch_key)
    correct += int(_num_correct(graphdef, state, x, y, valid))
  return correct / num_examples
