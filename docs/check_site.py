"""Builds the site and checks every page in headless Chromium, offline.

Run: ``python docs/check_site.py`` (builds into a temporary folder), or
``python docs/check_site.py --html docs/_build/html`` to check a site already
built. Needs Debian's ``chromium`` (``apt-get install chromium``; another
binary with ``--chromium PATH`` or ``$CHROMIUM``). Exits 1 if a check fails.

Every ``.html`` file of the site is served from 127.0.0.1 and opened with
``chromium --headless --dump-dom``, with every other host unresolvable, so the
browser sees what a reader without network sees. The server adds a small
probe script to each page, which waits for the page's load event and for
MathJax's first typesetting, then marks each image with whether it loaded.
From the DOM that Chromium dumps, a page fails when

* a formula is not rendered: an element of class ``math`` (what Sphinx writes
  for ``:math:`` and ``.. math::``) holds no MathJax output, still shows its
  LaTeX, or holds a MathJax error; or the prose (outside maths and code)
  shows LaTeX: a command such as ``\\alpha``, ``\\(``, ``$$`` or a ``:math:``
  role that was not parsed;
* an image did not load (its ``naturalWidth`` is 0);
* a link to this site points to a missing file or to an ``id`` that the
  target page does not have;
* the browser requested a file that the site does not have (script,
  stylesheet, font, image), or the page loads one from another host;
* the probe did not finish (the page did not load).

Links to other hosts are counted but not followed.
"""

import argparse
import concurrent.futures
import dataclasses
import functools
import html.parser
import http.server
import os
import pathlib
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.parse

DOCS = pathlib.Path(__file__).resolve().parent

PROBE = b"""<script>
window.addEventListener("load", () => {
  const root = document.documentElement;
  const done = () => {
    for (const img of document.images) {
      img.dataset.siteCheckLoaded = String(img.complete && img.naturalWidth > 0);
    }
    root.dataset.siteCheck = "done";
  };
  const startup = window.MathJax && MathJax.startup && MathJax.startup.promise;
  if (startup) {
    startup.then(done, (error) => { root.dataset.siteCheckMathError = error; done(); });
  } else {
    done();
  }
});
</script>
"""
"""Injected before ``</body>`` of every page the server sends."""

BROWSER_FLAGS = (
  "--headless",
  "--no-sandbox",  # CI runs as root.
  "--disable-gpu",
  "--disable-dev-shm-usage",  # Containers often have a small /dev/shm.
  "--no-first-run",
  "--no-default-browser-check",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-extensions",
  "--mute-audio",
  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
  "--virtual-time-budget=15000",
)


VOID_TAGS = ("area", "br", "col", "embed", "hr", "img", "input", "link", "meta",
             "source", "track", "wbr")  # fmt: skip
"""Elements without an end tag."""
CODE_TAGS = ("pre", "code", "kbd", "samp", "script", "style", "textarea")
"""Elements whose text is not prose (LaTeX there is not maths to render)."""
LOADED_LINKS = {"stylesheet", "icon", "preload", "modulepreload", "manifest"}
"""The ``<link rel>`` values that make the browser load the ``href``."""
RAW_LATEX = re.compile(r"\\[a-zA-Z]+|\\[()[\]]|\$\$|:math:`")
"""LaTeX in prose: a command (``\\alpha``), a delimiter, or a ``:math:`` role."""


@dataclasses.dataclass
class Page:
  """What one page showed in the browser."""

  path: str
  formulas: int = 0
  images: int = 0
  internal_links: int = 0
  external_links: int = 0
  problems: list[str] = dataclasses.field(default_factory=list)


class _Dom(html.parser.HTMLParser):
  """Collects ids, links, images and the state of the maths of a dumped DOM."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.ids: set[str] = set()
    self.links: list[str] = []
    self.images: list[tuple[str, str | None]] = []
    self.probe_done = False
    self.math_error: str | None = None
    self.formulas: list[dict] = []  # One per math element: output, error, text.
    self.raw_latex: list[str] = []  # LaTeX-like text outside maths and code.
    self.resources: list[str] = []  # What the page loads: scripts, styles, media.
    self._open: list[tuple[bool, bool]] = []  # Per open tag: starts maths, code.

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if "id" in attrs:
      self.ids.add(attrs["id"])
    if tag == "a" and attrs.get("name"):
      self.ids.add(attrs["name"])
    if tag == "html":
      self.probe_done = attrs.get("data-site-check") == "done"
      self.math_error = attrs.get("data-site-check-math-error")
    elif tag == "a" and attrs.get("href") is not None:
      self.links.append(attrs["href"])
    elif tag == "img":
      self.images.append((attrs.get("src", ""), attrs.get("data-site-check-loaded")))
    if tag == "link" and set((attrs.get("rel") or "").split()) & LOADED_LINKS:
      self.resources.append(attrs.get("href") or "")
    elif tag in ("script", "img", "iframe", "video", "audio", "source", "embed"):
      self.resources.append(attrs.get("src") or "")
    if tag in VOID_TAGS:
      return
    in_math = any(math for math, _ in self._open)
    starts_math = "math" in (attrs.get("class") or "").split() and not in_math
    self._open.append((starts_math, tag in CODE_TAGS))
    if starts_math:
      self.formulas.append({"output": 0, "error": 0, "text": ""})
    elif in_math and tag == "mjx-container":
      self.formulas[-1]["output"] += 1
    elif in_math and tag == "mjx-merror":
      self.formulas[-1]["error"] += 1

  def handle_endtag(self, tag):
    if self._open:
      self._open.pop()

  def handle_data(self, data):
    if any(math for math, _ in self._open):
      self.formulas[-1]["text"] += data
    elif not any(code for _, code in self._open):
      match = RAW_LATEX.search(data)
      if match:
        self.raw_latex.append(data[max(match.start() - 30, 0) : match.end() + 30])


def _handler(root: pathlib.Path, missing: list[tuple[str, str]]):
  class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves ``root``, adds the probe to pages and records missing files."""

    def __init__(self, *args, **kwargs):
      super().__init__(*args, directory=str(root), **kwargs)

    def do_GET(self):  # noqa: N802 (the name http.server calls)
      path = urllib.parse.urlsplit(self.path).path
      # The file SimpleHTTPRequestHandler serves (it stays under root).
      file = pathlib.Path(self.translate_path(self.path))
      if path.endswith(".html") and file.is_file():
        body = file.read_bytes().replace(b"</body>", PROBE + b"</body>", 1)
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return
      if not file.exists() and path != "/favicon.ico":  # The browser's own request.
        referer = urllib.parse.urlsplit(self.headers.get("Referer", "")).path
        missing.append((path, referer.lstrip("/")))
      super().do_GET()

    def log_message(self, format, *args):  # noqa: A002
      pass

  return Handler


def find_chromium(name: str | None = None) -> str | None:
  """The Chromium binary: ``name``, ``$CHROMIUM``, or the first on PATH."""
  for candidate in (name, os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
    if candidate and shutil.which(candidate):
      return shutil.which(candidate)
  return None


def dump_dom(chromium: str, url: str, timeout: float = 120) -> str:
  """The DOM of ``url`` after loading, as Chromium serialises it."""
  with tempfile.TemporaryDirectory() as profile:
    result = subprocess.run(
      [chromium, *BROWSER_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
      capture_output=True,
      text=True,
      timeout=timeout,
    )
  if result.returncode != 0:
    raise RuntimeError(f"{chromium} failed on {url}: {result.stderr[-2000:]}")
  return result.stdout


def _check_links(page: Page, dom: _Dom, site: pathlib.Path, ids: dict[str, set]):
  for href in dom.links:
    parts = urllib.parse.urlsplit(href)
    if parts.scheme or parts.netloc:
      page.external_links += 1
      continue
    page.internal_links += 1
    target = page.path
    if parts.path:
      target = posixpath.normpath(
        posixpath.join(posixpath.dirname(page.path), urllib.parse.unquote(parts.path))
      )
      if target.endswith("/") or (site / target).is_dir():
        target = posixpath.join(target, "index.html")
      if not (site / target).is_file():
        page.problems.append(f"broken link {href!r}: no file {target}")
        continue
    fragment = urllib.parse.unquote(parts.fragment)
    if fragment and target in ids and fragment not in ids[target]:
      page.problems.append(f"broken link {href!r}: {target} has no id {fragment!r}")


def _check_dom(page: Page, dom: _Dom) -> None:
  if not dom.probe_done:
    page.problems.append("the page did not finish loading")
  if dom.math_error:
    page.problems.append(f"MathJax failed: {dom.math_error}")
  for formula in dom.formulas:
    text = " ".join(formula["text"].split())
    if not formula["output"] or "\\(" in text or "\\[" in text:
      page.problems.append(f"unrendered maths: {text[:80]!r}")
    elif formula["error"]:
      page.problems.append(f"MathJax error in a formula: {text[:80]!r}")
    else:
      page.formulas += 1
  for url in dom.resources:
    if urllib.parse.urlsplit(url).netloc:
      page.problems.append(f"needs the network: loads {url}")
  for text in dom.raw_latex:
    page.problems.append(f"LaTeX outside maths: {' '.join(text.split())!r}")
  for src, loaded in dom.images:
    if loaded == "true":
      page.images += 1
    else:
      page.problems.append(f"image did not load: {src!r}")


def check_site(site: pathlib.Path, chromium: str, jobs: int = 2) -> list[Page]:
  """Opens every page of the built site ``site`` in Chromium; one Page each."""
  site = site.resolve()
  paths = sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html"))
  missing: list[tuple[str, str]] = []  # (path, the path that asked for it)
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(site, missing))
  threading.Thread(target=server.serve_forever, daemon=True).start()
  base = f"http://127.0.0.1:{server.server_address[1]}/"
  try:
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
      doms = pool.map(functools.partial(dump_dom, chromium), [base + p for p in paths])
      parsed = {}
      for path, text in zip(paths, doms):
        parsed[path] = _Dom()
        parsed[path].feed(text)
  finally:
    server.shutdown()
    server.server_close()
  ids = {path: dom.ids for path, dom in parsed.items()}
  pages = []
  for path, dom in parsed.items():
    page = Page(path)
    _check_dom(page, dom)
    _check_links(page, dom, site, ids)
    page.problems += [
      f"requested a missing file: {m}" for m, by in missing if by == path
    ]
    pages.append(page)
  others = [f"{m} (asked for by {by or '?'})" for m, by in missing if by not in parsed]
  if others:  # Requested by a stylesheet or a script.
    pages.append(
      Page("(other requests)", problems=[f"missing file: {m}" for m in others])
    )
  return pages


def build(out: pathlib.Path) -> bool:
  """Builds the site into ``out`` as ``make -C docs html`` does (``-W``)."""
  cmd = [
    sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
    "-d", str(out / ".doctrees"), str(DOCS), str(out),
  ]  # fmt: skip
  return subprocess.run(cmd).returncode == 0


def report(pages: list[Page]) -> str:
  """One line per page, then the problems and the totals."""
  lines = []
  for p in pages:
    status = "FAIL" if p.problems else "ok"
    lines.append(
      f"{status:4} {p.path}: {p.formulas} formulas rendered, {p.images} images "
      f"loaded, {p.internal_links} internal links checked"
      + (
        f", {p.external_links} external links not followed" if p.external_links else ""
      )
    )
    lines += [f"     {problem}" for problem in p.problems]
  failed = sum(bool(p.problems) for p in pages)
  lines.append(
    f"{len(pages)} pages, {failed} failed: {sum(p.formulas for p in pages)} formulas"
    f" rendered, {sum(p.images for p in pages)} images loaded, "
    f"{sum(p.internal_links for p in pages)} internal links checked"
  )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--html", type=pathlib.Path, help="a built site; skips the build")
  parser.add_argument("--chromium", help="the browser binary (default: chromium)")
  parser.add_argument("--jobs", type=int, default=2, help="browsers at once")
  args = parser.parse_args(argv)
  chromium = find_chromium(args.chromium)
  if chromium is None:
    parser.error("no Chromium found: apt-get install chromium, or pass --chromium")
  with tempfile.TemporaryDirectory() as tmp:
    site = args.html
    if site is None:
      site = pathlib.Path(tmp) / "html"
      if not build(site):
        print("the build failed (warnings are errors): no page checked")
        return 1
    pages = check_site(site, chromium, args.jobs)
  print(report(pages))
  return 1 if any(p.problems for p in pages) else 0


if __name__ == "__main__":
  sys.exit(main())
