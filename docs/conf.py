"""Sphinx configuration of the optax_lgm documentation.

Build: ``make -C docs html`` (or ``sphinx-build -W --keep-going -b html docs
docs/_build/html``). Neither the build nor a reader needs the network:
intersphinx is off, and the maths is rendered in the reader's browser by the
copy of MathJax that ``sphinx-mathjax-offline`` puts into the site's
``_static/mathjax``. ``python docs/check_site.py`` opens every page in
headless Chromium and checks its maths, images and links; the figures of the
results page are drawn by ``python docs/make_figures.py``.
"""

import inspect
import os
import sys
import warnings
from typing import Optional

import jax
import optax
from sphinx.util import logging

sys.path.insert(0, os.path.abspath(".."))
# sphinx-autodoc-typehints calls a Sphinx API deprecated for Sphinx 10.
warnings.filterwarnings(
  "ignore", category=DeprecationWarning, module="sphinx_autodoc_typehints"
)

import optax_lgm  # noqa: E402
from optax_lgm import _layers  # noqa: E402

project = "optax_lgm"
author = "The optax_lgm authors"
copyright = "2025, The optax_lgm authors"  # noqa: A001
version = release = optax_lgm.__version__

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "sphinx-mathjax-offline",  # Sets mathjax_path to a copy served with the site.
  "sphinx.ext.viewcode",
  "sphinx_autodoc_typehints",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path = []
# typehints_formatter (below) is a function, which Sphinx cannot pickle into
# its environment cache; that only means the configuration is re-read.
suppress_warnings = ["config.cache"]

# Autodoc: the docstrings follow Google style (napoleon); signatures keep the
# defaults, and the types go into the parameter descriptions.
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_preserve_defaults = True
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
typehints_fully_qualified = False
always_document_param_types = False
typehints_document_rtype = False

# The unions behind these aliases are long when expanded; show their names.
_TYPE_ALIASES = {
  jax.typing.ArrayLike: "ArrayLike",
  Optional[jax.typing.ArrayLike]: "ArrayLike | None",
  Optional[jax.typing.DTypeLike]: "DTypeLike | None",
  optax.ScalarOrSchedule: "ScalarOrSchedule",
  optax.Updates: "pytree",
  Optional[optax.Updates]: "pytree | None",
  _layers.Layers: "str | Callable[[path, leaf], label]",
  _layers.LayerAxes: "int | Callable[[path, leaf], int] | pytree | None",
  _layers.Mask: "pytree | Callable[[params], pytree] | None",
}


def typehints_formatter(annotation, config):
  """Names the long type aliases of jax, optax and optax_lgm."""
  try:
    alias = _TYPE_ALIASES.get(annotation)
  except TypeError:  # An unhashable annotation.
    return None
  return None if alias is None else f"``{alias}``"


_LOGGER = logging.getLogger(__name__)

html_theme = "furo"
html_title = f"optax_lgm {release}"
pygments_style = "sphinx"
pygments_dark_style = "monokai"


def _check_public_api_documented(app, env):
  """Warns (an error under ``-W``) for each undocumented name of ``__all__``.

  Every public name must be described by an ``autofunction`` / ``autoclass``
  (in ``api.rst``) as ``optax_lgm.<name>``, and must have a docstring.
  """
  objects = env.get_domain("py").objects
  for name in optax_lgm.__all__:
    if f"optax_lgm.{name}" not in objects:
      _LOGGER.warning(
        f"optax_lgm.{name} is in optax_lgm.__all__ but not documented: add it "
        "to docs/api.rst.",
        location="api",
      )
    elif not inspect.getdoc(getattr(optax_lgm, name)):
      _LOGGER.warning(f"optax_lgm.{name} has no docstring.", location="api")


def setup(app):
  app.connect("env-check-consistency", _check_public_api_documented)
