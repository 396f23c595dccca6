"""The documentation: docstring examples, documented API, runnable pages, build.

* Every ``>>>`` example in the docstrings of ``optax_lgm`` runs as a doctest.
* Every name of ``optax_lgm.__all__`` has a docstring and an entry in
  ``docs/api.rst`` (the Sphinx build checks the same, see ``docs/conf.py``).
* Every ``.. code-block:: python`` of the pages under ``docs/`` runs: the
  blocks of one page in order, in one namespace, in a temporary directory.
  Fragments that are not meant to run are written as ``::`` literal blocks.
* The site builds with ``sphinx-build -W`` (skipped without Sphinx), and
  ``docs/check_site.py`` opens every page of it in headless Chromium: maths
  rendered, images loaded, internal links resolved (skipped without Chromium,
  unless ``OPTAX_LGM_CHECK_SITE=1``, as in CI, makes a missing Chromium a
  failure).
* ``docs/make_figures.py`` draws a figure for each data file present, and the
  committed figures are drawn from the committed data.
"""

import doctest
import importlib
import json
import os
import pathlib
import pkgutil
import re
import subprocess
import sys
import textwrap

import pytest

import optax_lgm

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
sys.path.insert(0, str(DOCS))
import check_site  # noqa: E402
import make_figures  # noqa: E402

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


def chromium_or_skip() -> str:
  chromium = check_site.find_chromium()
  if chromium is None:
    if os.environ.get("OPTAX_LGM_CHECK_SITE") == "1":
      pytest.fail("OPTAX_LGM_CHECK_SITE=1 but no Chromium: apt-get install chromium")
    pytest.skip("no Chromium (apt-get install chromium)")
  return chromium


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
  assert (out / "_static" / "mathjax" / "tex-chtml.js").exists()

  pages = {p.path: p for p in check_site.check_site(out, chromium_or_skip())}
  assert not any(p.problems for p in pages.values()), check_site.report(
    list(pages.values())
  )
  assert pages["lgm.html"].formulas > 10
  includes = re.findall(
    r"^\.\. include:: (figures/\S+)$", (DOCS / "results.rst").read_text(), re.M
  )
  figures = sum((DOCS / inc).read_text().count(".. figure::") for inc in includes)
  assert figures, "the results page includes no figures"
  assert pages["results.html"].images >= figures


def write_page(path: pathlib.Path, body: str) -> None:
  path.write_text(f"<!DOCTYPE html><html><head></head><body>{body}</body></html>")


def test_check_site_finds_problems(tmp_path):
  """A page of each kind of fault, and one good page (no MathJax: no maths)."""
  chromium = chromium_or_skip()
  png = DOCS / "figures" / "compare_digits_lgm.png"
  (tmp_path / "ok.png").write_bytes(png.read_bytes())
  write_page(tmp_path / "good.html", '<img src="ok.png"><a href="maths.html#x">x</a>')
  write_page(
    tmp_path / "maths.html",
    '<span id="x" class="math">\\(a^2\\)</span><code>\\alpha</code>'
    "<p>scaled by :math:`\\alpha`</p>",
  )
  write_page(tmp_path / "image.html", '<img src="gone.png">')
  write_page(tmp_path / "network.html", '<script src="https://cdn.test/m.js"></script>')
  write_page(
    tmp_path / "link.html", '<a href="gone.html">a</a><a href="good.html#y">b</a>'
  )
  pages = {p.path: p for p in check_site.check_site(tmp_path, chromium)}
  assert pages["good.html"].problems == []
  assert pages["good.html"].images == 1
  assert pages["good.html"].internal_links == 1
  assert pages["maths.html"].problems == [
    "unrendered maths: '\\\\(a^2\\\\)'",
    "LaTeX outside maths: 'scaled by :math:`\\\\alpha`'",
  ]
  assert pages["image.html"].problems == [
    "image did not load: 'gone.png'",
    "requested a missing file: /gone.png",
  ]
  assert pages["network.html"].problems == [
    "needs the network: loads https://cdn.test/m.js"
  ]
  assert pages["link.html"].problems == [
    "broken link 'gone.html': no file gone.html",
    "broken link 'good.html#y': good.html has no id 'y'",
  ]


def fake_comparison(optimizers=("sgd", "lgm", "layer_sam"), seeds=2) -> dict:
  def run(name, seed):
    stats = {
      "lgm": {
        "lgm_alpha": {"a/kernel": 2.0 + seed, "b/kernel": [0.5, 0.7]},
        "lgm_scale": {"a/kernel": 2.0, "b/kernel": 0.5},
      },
      "layer_sam": {"sam_selected_count": {"a": 10 + seed, "b": 10 - seed}},
    }.get(name, {})
    return {
      # The last seed's run stopped early.
      "curve": [
        {"step": s, "test_accuracy": 0.1 * s + 0.01 * seed}
        for s in ((1, 5) if seed == seeds - 1 else (1, 5, 9))
      ],
      "history": [{"epoch": e, "step": 10 * e, "layer_stats": stats} for e in (1, 2)],
    }

  args = {"dataset": "digits", "model": "cnn", "seeds": seeds, "epochs": 2,
          "batch_size": 8, "eval_every": 4, "target": 0.5, "out": "/tmp/x"}  # fmt: skip
  runs = {name: [run(name, seed) for seed in range(seeds)] for name in optimizers}
  return {"args": args, "runs": runs}


def test_spread_over_seeds():
  xs, mean, low, high = make_figures._spread([{5: 0.5, 1: 0.7}, {1: [0.2, 0.4]}])
  assert xs == [1, 5]
  np = pytest.importorskip("numpy")
  np.testing.assert_allclose(mean, [0.5, 0.5])
  np.testing.assert_allclose(low, [0.3, 0.5])
  np.testing.assert_allclose(high, [0.7, 0.5])


def test_compare_command():
  args = {"dataset": "digits", "seeds": 3, "out": "x", "data_dir": None,
          "no_progress": True, "resume": False, "skip_nonfinite": True}  # fmt: skip
  assert make_figures.compare_command({"args": args}) == (
    "python -m examples.compare --dataset digits --seeds 3 --skip_nonfinite"
  )
  assert make_figures.compare_command({"args": args, "command": "c"}) == "c"


def test_make_figures_draws_what_is_present(tmp_path):
  pytest.importorskip("PIL")
  from PIL import Image

  data, out = tmp_path / "data", tmp_path / "figures"
  data.mkdir()
  (data / "compare_digits.json").write_text(json.dumps(fake_comparison()))
  (data / "compare_fashion_mnist.json").write_text(
    json.dumps(fake_comparison(optimizers=("sgd",)))
  )
  written = make_figures.make_figures(data, out)
  assert sorted(p.name for p in written) == [
    "compare_digits.inc",
    "compare_digits_curves.png",
    "compare_digits_layer_sam.png",
    "compare_digits_lgm.png",
    "compare_fashion_mnist.inc",
    "compare_fashion_mnist_curves.png",
  ]
  sha = make_figures.sha256(data / "compare_digits.json")
  assert Image.open(out / "compare_digits_lgm.png").text[make_figures.SOURCE_KEY] == sha
  inc = (out / "compare_digits.inc").read_text()
  assert inc.count(".. figure:: /figures/compare_digits_") == 3
  command = (
    "python -m examples.compare --dataset digits --model cnn --seeds 2 --epochs 2 "
    "--batch_size 8 --eval_every 4 --target 0.5"
  )
  assert f"Data: ``{command}``" in inc

  def contender(seconds):
    reached = [s for s in seconds if s is not None]
    return {
      "seconds": seconds,
      "final_accuracy": [0.95 if s else 0.8 for s in seconds],
      "median_seconds": reached[0] if reached else None,
    }

  timing = {
    "command": "python -m benchmarks.time_to_target",
    "machine": "a test",
    "target": 0.9,
    "contenders": {"sgd": contender([3.0, None]), "sam": contender([None, None])},
  }
  (data / "time_to_target.json").write_text(json.dumps(timing))
  written = make_figures.make_figures(data, out)
  assert {"time_to_target.png", "time_to_target.inc"} <= {p.name for p in written}
  inc = (out / "time_to_target.inc").read_text()
  assert "``python -m benchmarks.time_to_target``, run on a test" in inc


def test_committed_figures_match_their_data():
  pytest.importorskip("PIL")
  from PIL import Image

  sources = sorted((DOCS / "data").glob("*.json"))
  assert sources, "no data under docs/data"
  for source in sources:
    inc = DOCS / "figures" / f"{source.stem}.inc"
    assert inc.exists(), (
      f"no figures for {source.name}: run python docs/make_figures.py"
    )
    pngs = re.findall(r"^\.\. figure:: /figures/(\S+)$", inc.read_text(), re.M)
    assert pngs, inc
    for png in pngs:
      recorded = Image.open(DOCS / "figures" / png).text.get(make_figures.SOURCE_KEY)
      assert recorded == make_figures.sha256(source), (
        f"docs/figures/{png} was not drawn from the current docs/data/{source.name}: "
        "run python docs/make_figures.py"
      )
