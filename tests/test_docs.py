"""The documentation: docstring examples, documented API, runnable pages, build.

* Every ``>>>`` example in the docstrings of ``optax_lgm`` runs as a doctest.
* Every name of ``optax_lgm.__all__`` has a docstring and an entry in
  ``docs/api.rst`` (the Sphinx build checks the same, see ``docs/conf.py``).
* Every ``.. code-block:: python`` of the pages under ``docs/`` runs: the
  blocks of one page in order, in one namespace, in a temporary directory.
  Fragments that are not meant to run are written as ``::`` literal blocks.
* The site builds with ``sphinx-build -W`` (skipped without Sphinx).
"""

import doctest
import importlib
import pathlib
import pkgutil
import re
import subprocess
import sys
import textwrap

import pytest

import optax_lgm

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
MODULES = sorted(
  ["optax_lgm"]
  + [f"optax_lgm.{m.name}" for m in pkgutil.iter_modules(optax_lgm.__path__)]
)
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.rst"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(
    module,
    optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
    raise_on_error=False,
    report=True,
  )
  assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"


def test_every_public_name_is_documented():
  api = (DOCS / "api.rst").read_text()
  documented = set(re.findall(r"^\.\. auto(?:function|class):: (\w+)", api, re.M))
  missing = [name for name in optax_lgm.__all__ if name not in documented]
  assert not missing, f"not in docs/api.rst: {missing}"
  undocumented = [
    name
    for name in optax_lgm.__all__
    if not (getattr(optax_lgm, name).__doc__ or "").strip()
  ]
  assert not undocumented, f"no docstring: {undocumented}"
  unknown = sorted(documented - set(optax_lgm.__all__))
  assert not unknown, f"docs/api.rst documents names not in __all__: {unknown}"


def python_blocks(text: str) -> list[str]:
  """The contents of the ``.. code-block:: python`` directives of a page."""
  blocks = []
  lines = text.splitlines()
  i = 0
  while i < len(lines):
    match = re.match(r"^(\s*)\.\. code-block:: python\s*$", lines[i])
    i += 1
    if not match:
      continue
    indent = len(match.group(1))
    body = []
    # Options (":caption: ...") and then the indented body.
    while i < len(lines) and re.match(r"^\s+:\w[\w-]*:", lines[i]):
      i += 1
    while i < len(lines) and (
      not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
    ):
      body.append(lines[i])
      i += 1
    blocks.append(textwrap.dedent("\n".join(body)).strip("\n"))
  return blocks


def test_python_blocks_are_found():
  text = ".. code-block:: python\n   :caption: x\n\n   a = 1\n\n   b = a\nend\n"
  assert python_blocks(text) == ["a = 1\n\nb = a"]


@pytest.mark.parametrize(
  "page", [p for p in PAGES if python_blocks((DOCS / p).read_text())]
)
def test_page_code_runs(page, tmp_path, monkeypatch):
  pytest.importorskip("flax")
  import matplotlib

  matplotlib.use("Agg")
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": f"docs_{page}"}
  for i, block in enumerate(python_blocks((DOCS / page).read_text())):
    code = compile(block, f"docs/{page} (python block {i + 1})", "exec")
    exec(code, namespace)  # noqa: S102


def test_docs_build(tmp_path):
  pytest.importorskip("sphinx")
  pytest.importorskip("furo")
  pytest.importorskip("sphinx_autodoc_typehints")
  out = tmp_path / "html"
  cmd = [
    sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
    "-d", str(tmp_path / "doctrees"), str(DOCS), str(out),
  ]  # fmt: skip
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  assert (out / "api.html").exists()
