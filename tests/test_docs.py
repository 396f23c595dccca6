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
* ``docs/make_tables.py`` writes the tables of the results page, and the
  committed tables are what it writes now from the committed data.
"""

import ast
import contextlib
import doctest
import importlib
import io
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
import make_tables  # noqa: E402

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


LOSS_LINE = re.compile(r"^(?:(.+): |loss )(\d+\.\d+) -> (\d+\.\d+)$", re.M)


def losses_fall(count: int, factor: float):
  """A check: ``count`` printed lines ``... a -> b`` with ``b <= a / factor``."""

  def check(namespace: dict, output: str) -> None:
    del namespace
    falls = LOSS_LINE.findall(output)
    assert len(falls) == count, f"expected {count} 'a -> b' loss lines:\n{output}"
    for name, start, end in falls:
      assert float(end) <= float(start) / factor, (
        f"{name or 'the loss'} went from {start} to {end}, not down by {factor}x"
      )

  return check


def prints(*lines: str):
  """A check: the output holds these lines, in this order (others may come between)."""

  def check(namespace: dict, output: str) -> None:
    del namespace
    printed = output.splitlines()
    position = 0
    for line in lines:
      assert line in printed[position:], f"{line!r} not printed, in order:\n{output}"
      position = printed.index(line, position) + 1

  return check


def all_of(*checks):
  def check(namespace: dict, output: str) -> None:
    for one in checks:
      one(namespace, output)

  return check


def _diagnostics(namespace: dict, output: str) -> None:
  counts = namespace["counts"]  # layer_sam with k=1 for 20 steps
  assert sum(counts.values()) == 20, counts
  assert all(type(c) is int for c in counts.values()), counts
  assert pathlib.Path("lgm_scale.png").stat().st_size > 0, "no figure written"


def _lgm_adam(namespace: dict, output: str) -> None:
  assert float(output.splitlines()[-1]) < 1e-6, output  # the factor 100 is gone


def _layer_sam(namespace: dict, output: str) -> None:
  static = namespace["step"]  # The StaticSelection of the loop.
  assert static.selection is not None and static.compilations <= 3, static.changes
  m_sharpness = float(output.splitlines()[-1])
  assert m_sharpness > 1e-4, "per-shard perturbations should move the weights"


RESULTS = {
  "dgs.rst": prints(
    "global {'b': array([ 0.002, -0.002], dtype=float32), "
    "'w': array([ 0.5976, -0.1992,  0.0996,  0.0996], dtype=float32)}",
    "layer {'b': array([ 0.5, -0.5], dtype=float32), "
    "'w': array([ 0.6, -0.2,  0.1,  0.1], dtype=float32)}",
    "element {'b': array([ 1., -1.], dtype=float32), "
    "'w': array([ 1., -1.,  1.,  1.], dtype=float32)}",
    "[-0.0003  0.0003]",
    "[-0.1  0.1]",
  ),
  "guides/diagnostics.rst": all_of(losses_fall(1, 2.0), _diagnostics),
  "guides/jax.rst": all_of(losses_fall(4, 2.0), prints("1")),
  "guides/layers.rst": prints(
    "('blocks/bias', 'blocks/kernel', 'head/bias', 'head/kernel')",
    "('blocks', 'head')",
    "('body', 'head')",
    "('blocks[0]', 'blocks[1]', 'blocks[2]', 'head')",
    "(4,)",
    "(3, 4, 4)",
    "('blocks/dense[0]', 'blocks/dense[1]', 'blocks/dense[2]', 'blocks/norm[0]', "
    "'blocks/norm[1]', 'blocks/norm[2]', 'head')",
    "('blocks/bias', 'blocks/kernel', 'head/kernel')",
    "('blocks/kernel', 'head/kernel')",
  ),
  "guides/linen.rst": losses_fall(1, 1.05),
  "guides/nnx.rst": losses_fall(1, 1.05),
  "guides/sharding.rst": all_of(losses_fall(1, 2.0), prints("P(None, 'data')", "P()")),
  "index.rst": losses_fall(1, 2.0),
  "layer_sam.rst": all_of(losses_fall(1, 1.1), _layer_sam),
  "lgm.rst": _lgm_adam,
}
"""What each page's code must print or leave behind, beyond running.

Every page that trains states how far its loss falls (a ``... a -> b`` line):
a learning rate off by orders of magnitude fails here, not only in a reader's
hands.
"""


def test_every_page_with_code_has_its_result_checked():
  with_code = {p for p in PAGES if python_blocks((DOCS / p).read_text())}
  assert with_code == set(RESULTS), (
    f"pages without a check in RESULTS: {sorted(with_code - set(RESULTS))}; "
    f"checks of pages without code: {sorted(set(RESULTS) - with_code)}"
  )


def run_page(page: str) -> tuple[dict, str]:
  """Runs the python blocks of ``page`` in order; returns the namespace and output."""
  namespace = {"__name__": f"docs_{page}"}
  output = io.StringIO()
  with contextlib.redirect_stdout(output):
    for i, block in enumerate(python_blocks((DOCS / page).read_text())):
      code = compile(block, f"docs/{page} (python block {i + 1})", "exec")
      exec(code, namespace)  # noqa: S102
  return namespace, output.getvalue()


@pytest.mark.parametrize("page", sorted(RESULTS))
def test_page_code_runs_and_gives_its_result(page, tmp_path, monkeypatch):
  pytest.importorskip("flax")
  import matplotlib

  matplotlib.use("Agg")
  monkeypatch.chdir(tmp_path)
  namespace, output = run_page(page)
  print(output)
  RESULTS[page](namespace, output)


README = DOCS.parent / "README.md"
READY_OPTIMIZERS = ("lgm", "dgs", "layer_sam")


def documented_optimizers(text: str) -> list[str]:
  """Each ready optimizer the text builds (``optax_lgm.dgs(3e-4)``), as code.

  Looks in code (rst ``code-block``, Markdown fences) and inline literals.
  Arguments that need the page's own names (``mask=``, ``layer_axes=``) are
  left out: the learning rate and the numeric options stay.
  """
  found = []
  for match in re.finditer(r"optax_lgm\.(?:lgm|dgs|layer_sam)\(", text):
    depth, end = 0, match.end() - 1
    while end < len(text):
      depth += {"(": 1, ")": -1}.get(text[end], 0)
      end += 1
      if depth == 0:
        break
    source = " ".join(text[match.start() : end].split())
    try:
      call = ast.parse(source, mode="eval").body
    except SyntaxError:
      continue
    assert isinstance(call, ast.Call)
    call.keywords = [
      kw for kw in call.keywords
      if kw.arg not in ("mask", "layer_axes", "layers", "gamma", "axis_name")
    ]  # fmt: skip
    found.append(ast.unparse(call))
  return found


def _sources() -> dict[str, str]:
  pages = {p: (DOCS / p).read_text() for p in PAGES if p != "results.rst"}
  return {**pages, "README.md": README.read_text()}


DOCUMENTED = sorted(
  {(call, where) for where, text in _sources().items()
   for call in documented_optimizers(text)}
)  # fmt: skip


def test_documented_optimizers_are_found():
  text = "``nnx.Optimizer(model, optax_lgm.dgs(30.0),\nwrt=nnx.Param)``, x"
  assert documented_optimizers(text) == ["optax_lgm.dgs(30.0)"]
  calls = {call for call, _ in DOCUMENTED}
  assert "optax_lgm.dgs(0.0003)" in calls
  assert len({where for _, where in DOCUMENTED}) >= 8


@pytest.mark.parametrize(("call", "where"), DOCUMENTED)
def test_documented_optimizer_trains(call, where):
  """Every ready optimizer the docs build cuts a small MLP's loss by 1.5x in 50 steps.

  The MLP (874 parameters) is that of ``docs/guides/jax.rst``. A learning rate
  that belongs to another denominator (``dgs(30.0)``) or is off by orders of
  magnitude diverges or stalls here.
  """
  import jax
  import jax.numpy as jnp
  import optax

  tx = eval(call, {"optax": optax, "optax_lgm": optax_lgm})  # noqa: S307
  keys = jax.random.split(jax.random.key(0), 2)
  params = {
    f"dense{i}": {"kernel": jax.random.normal(key, (m, n)) / jnp.sqrt(m),
                  "bias": jnp.zeros(n)}
    for i, (key, m, n) in enumerate(zip(keys, (16, 32), (32, 10)))
  }  # fmt: skip
  x = jax.random.normal(jax.random.key(1), (64, 16))
  y = jax.random.randint(jax.random.key(2), (64,), 0, 10)

  def loss_fn(params):
    h = jax.nn.relu(x @ params["dense0"]["kernel"] + params["dense0"]["bias"])
    logits = h @ params["dense1"]["kernel"] + params["dense1"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  grad_fn = jax.grad(lambda p, _: loss_fn(p))

  @jax.jit
  def step(params, state):
    updates, state = tx.update(grad_fn(params, 0), state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  start, state = float(loss_fn(params)), tx.init(params)
  for _ in range(50):
    params, state = step(params, state)
  end = float(loss_fn(params))
  assert end <= start / 1.5, f"{call} ({where}): the loss went {start:.3f} -> {end:.3f}"


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

  sources = make_figures.sources(DOCS / "data")
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


def test_every_data_file_has_a_table_or_figures():
  drawn = make_figures.sources(DOCS / "data")
  for source in sorted((DOCS / "data").glob("*.json")):
    assert source.stem in make_tables.TABLES or source in drawn, (
      f"docs/data/{source.name} is on no page: give it a table in "
      "docs/make_tables.py or figures in docs/make_figures.py"
    )


@pytest.mark.parametrize("stem", list(make_tables.TABLES))
def test_committed_tables_match_their_data(stem):
  source = DOCS / "data" / f"{stem}.json"
  if not source.exists():
    pytest.skip(f"no docs/data/{source.name}")
  inc = make_tables.table_path(DOCS / "figures", stem)
  fix = "run python docs/make_tables.py"
  assert inc.exists(), f"no table for docs/data/{source.name}: {fix}"
  text = inc.read_text()
  recorded = re.search(r"SHA-256 ([0-9a-f]{64})", text)
  assert recorded and recorded.group(1) == make_tables.sha256(source), (
    f"docs/figures/{inc.name} is older than docs/data/{source.name}: {fix}"
  )
  assert text == make_tables.render(source), (
    f"docs/figures/{inc.name} differs from what docs/make_tables.py writes: {fix}"
  )
  assert f".. include:: figures/{inc.name}" in (DOCS / "results.rst").read_text()
