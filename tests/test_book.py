"""The site: a strict build (-W) from the committed, executed notebooks, then every page opened in a real browser.

The browser test needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them). It serves the
built site on localhost and, for each page, fails on any request the server answers with an error, any request
that leaves the site (a CDN the offline book must not need), a console error, an image that did not load,
math that MathJax did not typeset, or a page without the figures and tables it should have. One screenshot per
page is kept in ``_build/browser-screenshots/`` as a test artifact.
"""
import functools
import html.parser
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "_build" / "browser-screenshots"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="session")
def built_site(tmp_path_factory) -> Path:
    subprocess.run([sys.executable, str(REPO / "tools" / "vendor_web_assets.py")], check=True)
    output = tmp_path_factory.mktemp("book")
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    build = subprocess.run([str(jupyter_book), "build", str(REPO), "--path-output", str(output), "-W", "--keep-going",
                            "--builder", "html"], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    return output / "_build" / "html"


def site_pages(html: Path) -> list[str]:
    """Every content page (not Sphinx's generated index, search and module-source pages)."""
    return sorted(str(path.relative_to(html)) for path in html.rglob("*.html")
                  if not path.relative_to(html).parts[0].startswith("_")
                  and path.name not in ("genindex.html", "search.html"))


def test_book_builds_without_warnings(built_site):
    page = (built_site / "notebooks" / "timofeev2022.html").read_text()
    assert "Comparison with the report" in page and page.count("<img") >= 5  # executed figures are embedded
    assert "Tie rule" in (built_site / "book" / "protocol.html").read_text()
    assert "retrieval_metrics" in (built_site / "book" / "api.html").read_text()
    assert "Hodosh" in (built_site / "book" / "references.html").read_text()  # the bibliography is rendered


class ExternalAssets(html.parser.HTMLParser):
    """Collects the scripts, stylesheets, images and frames a page loads from outside the site."""

    LOADING = {"script": "src", "img": "src", "iframe": "src", "link": "href"}

    def __init__(self):
        super().__init__()
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        url = attrs.get(self.LOADING.get(tag, ""), "") or ""
        loads = tag != "link" or attrs.get("rel") in ("stylesheet", "preload", "modulepreload", "icon")
        if loads and url.startswith(("http://", "https://", "//")):
            self.external.append(f"<{tag}> {url}")


def test_built_site_references_no_cdn(built_site):
    """Every script, stylesheet and image a page loads is part of the built site. (URLs that are only
    followed on a click, such as sphinx-thebe's Binder launcher, are links, not assets.)"""
    for name in site_pages(built_site):
        parser = ExternalAssets()
        parser.feed((built_site / name).read_text())
        assert not parser.external, f"{name} loads {parser.external}: the offline book must serve its assets itself"


class RecordingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the site and remembers every request's path and status."""

    def log_request(self, code="-", size="-"):
        self.server.requests.append((self.path, int(code) if str(code).isdigit() else 0))

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site_server(built_site):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(RecordingHandler, directory=str(built_site)))
    server.requests = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser test: install Debian's chromium and chromium-driver")
        pytest.skip("chromium / chromedriver not installed (apt install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1600"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


WAIT_FOR_MATHJAX = """
const done = arguments[arguments.length - 1];
const started = Date.now();
(function wait() {  // the MathJax script loads deferred: poll until its startup promise exists, then await it
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { MathJax.startup.promise.then(() => done(true)); }
  else if (!document.querySelector('script[src*="mathjax"]') || Date.now() - started > 120000) { done(false); }
  else { setTimeout(wait, 100); }
})();
"""

PAGE_STATE = """
const images = Array.from(document.querySelectorAll('article img'));
return {
  resources: performance.getEntriesByType('resource').map(entry => entry.name),
  images: images.length,
  broken_images: images.filter(img => !img.complete || img.naturalWidth === 0).map(img => img.src.slice(0, 80)),
  tables: document.querySelectorAll('article table').length,
  math: document.querySelectorAll('article .math').length,
  typeset: document.querySelectorAll('article mjx-container').length,
  math_errors: document.querySelectorAll('mjx-merror').length,
  widgets: document.querySelectorAll('article .jupyter-widgets').length,
  // shown code blocks wider than their column (a hidden input has no offsetParent)
  wide_code: Array.from(document.querySelectorAll('article div.cell_input pre'))
    .filter(pre => pre.offsetParent !== null && pre.scrollWidth > pre.clientWidth + 1).length,
  // pandas' truncation: a row (or a header cell) of "..."
  truncated_tables: Array.from(document.querySelectorAll('article table')).filter(table =>
    Array.from(table.querySelectorAll('tr')).some(row => {
      const cells = Array.from(row.querySelectorAll('th, td')).map(cell => cell.textContent.trim());
      return cells.length > 1 && cells.every(text => text === '...' || text === '\u2026');
    }) || Array.from(table.querySelectorAll('thead th')).some(cell => cell.textContent.trim() === '...')).length,
};
"""

# what each page must show, at least: executed figures, tables, typeset equations, rendered ipywidgets
EXPECTED_CONTENT = {
    "book/protocol.html": {"tables": 2, "equations": 3},
    "notebooks/timofeev2022.html": {"figures": 5, "tables": 3, "equations": 3},
    "notebooks/coder2022.html": {"figures": 3, "tables": 8, "equations": 2},
    "notebooks/icone2024.html": {"figures": 6, "tables": 5, "equations": 2},
    "notebooks/drcl2024.html": {"figures": 5, "tables": 8, "equations": 3},
    "notebooks/shi2024.html": {"figures": 3, "tables": 6, "equations": 1},
    "notebooks/comparison.html": {"figures": 1, "tables": 4},
    "notebooks/explorer.html": {"figures": 4, "tables": 1, "widgets": 1},
    "notebooks/performance.html": {"figures": 3, "tables": 6},
}


KEYS = {"figures": "images", "tables": "tables", "equations": "typeset", "widgets": "widgets"}


def test_every_page_in_a_real_browser(built_site, site_server, browser):
    base = f"http://127.0.0.1:{site_server.server_address[1]}/"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    problems = []
    # A first visit to any pydata-sphinx-theme site logs "invalid theme mode" (no light/dark choice stored yet)
    # as a console error; a returning reader has the choice stored. Store it once, as the theme itself would.
    browser.get(base + "book/intro.html")
    browser.execute_script('localStorage.setItem("mode", "auto")')
    browser.get_log("browser")
    for name in site_pages(built_site):
        site_server.requests.clear()
        browser.get(base + name)
        browser.set_script_timeout(150)  # a loaded CI machine can take long to typeset a page's math
        has_mathjax = browser.execute_async_script(WAIT_FOR_MATHJAX)
        state = browser.execute_script(PAGE_STATE)
        console_errors = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        browser.save_screenshot(str(SCREENSHOTS / (name.replace("/", "__").removesuffix(".html") + ".png")))

        failed = [(path, status) for path, status in site_server.requests if status >= 400]
        external = [url for url in state["resources"] if not url.startswith(base)]
        expected = EXPECTED_CONTENT.get(name, {})
        checks = {
            "requests the server refused": failed,
            "requests that leave the site": external,
            "console errors": console_errors,
            "images that did not load": state["broken_images"],
            "MathJax errors": state["math_errors"],
            "code blocks wider than the page": state["wide_code"],
            "tables pandas truncated": state["truncated_tables"],
            "math left untypeset": state["math"] and (not has_mathjax or state["typeset"] == 0) and (
                f"MathJax ready: {has_mathjax}, {state['typeset']} typeset of {state['math']} math elements"),
            **{f"fewer than {count} {what}": state[KEYS[what]] < count for what, count in expected.items()},
        }
        problems += [f"{name}: {what}: {detail}" for what, detail in checks.items() if detail]
    assert not problems, "\n".join(problems)
    assert set(EXPECTED_CONTENT) <= set(site_pages(built_site)), "a page named in EXPECTED_CONTENT was not built"
