"""JupyterLab in a real browser: the retrieval explorer's widgets answer a typed caption and a chosen image.

JupyterLab is started headless on 127.0.0.1 (a free port, a random token, its settings, workspaces and runtime
files in a temporary folder) on a copy of ``notebooks/explorer.ipynb`` that papermill prepared with the smoke
parameters (``--prepare-only``: parameters injected, nothing executed; the repository is not touched). Chromium
runs all cells from the Run menu, types a caption into the explorer's text box and presses Enter, then picks an
image number and presses *find captions*; each time the figure in the widget's output area must change.
Needs Debian's ``chromium`` and ``chromium-driver`` (skipped without them, except under CI) and the real data.
A screenshot of the last state is kept in ``_build/browser-screenshots/jupyterlab-explorer.png``.
"""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "explorer.ipynb"
SMOKE_PARAMETERS = REPO / "notebooks" / "params" / "explorer_smoke.yaml"
SCREENSHOT = REPO / "_build" / "browser-screenshots" / "jupyterlab-explorer.png"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
RUN_TIMEOUT_S = 300  # all cells of the smoke-sized explorer: about a minute on a loaded 2-core machine

# No news or update pop-ups, and every cell in the DOM (no windowed rendering of cells out of view).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                         "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def require(found: bool, what: str) -> None:
    if not found:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the JupyterLab test: {what}")
        pytest.skip(what)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, data_root):
    """(base URL, token, folder) of a JupyterLab server on a prepared copy of the explorer notebook."""
    import importlib.util

    require(importlib.util.find_spec("jupyterlab") is not None, "jupyterlab not installed (the lab extra)")
    import nbformat
    import papermill

    folder = tmp_path_factory.mktemp("lab")
    notebooks, state = folder / "notebooks", folder / "state"
    notebooks.mkdir()
    prepared = papermill.execute_notebook(str(NOTEBOOK), str(notebooks / NOTEBOOK.name),
                                          parameters=yaml.safe_load(SMOKE_PARAMETERS.read_text()),
                                          prepare_only=True, progress_bar=False)
    for cell in prepared.cells:  # the saved outputs go, so that every prompt and figure seen comes from this run
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    prepared.metadata.pop("widgets", None)
    nbformat.write(prepared, notebooks / NOTEBOOK.name)
    for name, settings in LAB_SETTINGS.items():
        path = state / "settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
    token, port = secrets.token_hex(16), free_port()
    environment = {**os.environ, "XMR_DATA": str(data_root), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                   "JUPYTER_CONFIG_DIR": str(state / "config"), "JUPYTER_RUNTIME_DIR": str(state / "runtime"),
                   "JUPYTERLAB_SETTINGS_DIR": str(state / "settings"),
                   "JUPYTERLAB_WORKSPACES_DIR": str(state / "workspaces")}
    log = (folder / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={notebooks}", "--LabApp.expose_app_in_browser=True",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        cwd=notebooks, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def api(path, body=None):
            request = urllib.request.Request(f"{base}/api/{path}", headers={"Authorization": f"token {token}"},
                                             data=None if body is None else json.dumps(body).encode())
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())

        def server_log() -> str:
            return (folder / "server.log").read_text()[-3000:]

        def poll(what, check, timeout):
            deadline = time.monotonic() + timeout
            while True:
                if server.poll() is not None:
                    pytest.fail(f"JupyterLab exited ({server.returncode}):\n{server_log()}")
                try:
                    if check():
                        return
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"{what} in {timeout} s:\n{server_log()}")
                time.sleep(0.5)  # polling the server, before any page is open

        poll("JupyterLab did not answer", lambda: api("status") is not None, 90)
        # The notebook's session and kernel exist before the page opens: the page attaches to them instead of
        # starting (and replacing) kernels of its own while the test already clicks.
        session = api("sessions", {"path": NOTEBOOK.name, "type": "notebook", "name": NOTEBOOK.name,
                                   "kernel": {"name": "python3"}})
        yield base, token, session["kernel"]["id"]
    finally:
        server.send_signal(signal.SIGINT)  # twice: JupyterLab asks for confirmation on the first one
        time.sleep(0.2)
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)  # it shuts its kernels down first
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)  # the server's own process group: it and its kernels
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def browser():
    require(bool(CHROMIUM and CHROMEDRIVER), "chromium / chromedriver not installed (apt install chromium "
                                             "chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


# The state of the open notebook: every code cell's prompt ("[3]:", "[*]:", "[ ]:"), the kernel's status and
# any traceback shown (IPython prints "Traceback (most recent call last)" in an error's header).
NOTEBOOK_STATE = """
const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
const widget = window.jupyterapp && window.jupyterapp.shell.currentWidget;
const kernel = widget && widget.sessionContext && widget.sessionContext.session
  && widget.sessionContext.session.kernel;
if (!panel || !kernel) return null;
return {
  prompts: Array.from(panel.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')).map(e => e.textContent.trim()),
  kernel_id: kernel.id,
  kernel: kernel.connectionStatus === 'connected' ? kernel.status : kernel.connectionStatus,
  tracebacks: Array.from(panel.querySelectorAll('.jp-OutputArea-output'))
    .map(e => e.textContent).filter(text => text.includes('Traceback (most recent call last)'))
    .map(text => text.slice(-1500)),
};
"""

WIDGET = "//div[contains(@class, 'widget-vbox')][.//button[normalize-space()='find images']]"


def output_state(driver) -> dict:
    """What the explorer's output area shows: the figure's data URL (or None) and any text (an error message)."""
    area = driver.find_element("xpath", f"{WIDGET}//div[contains(@class, 'widget-output')]")
    images = area.find_elements("css selector", "img")
    return {"figure": images[0].get_attribute("src") if images else None, "text": area.text.strip()}


def test_explorer_widgets_answer_queries_in_jupyterlab(lab, browser):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    base, token, kernel_id = lab
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    wait = WebDriverWait(browser, 120, poll_frequency=0.5)
    try:
        browser.get(f"{base}/lab/tree/{NOTEBOOK.name}?token={token}")
        wait.until(lambda d: (s := d.execute_script(NOTEBOOK_STATE)) and (s["kernel_id"], s["kernel"]) == (
            kernel_id, "idle"))

        # Run > Run All Cells, as a reader would
        wait.until(lambda d: d.find_element("xpath", "//li[contains(@class, 'lm-MenuBar-item')]"
                                                     "[normalize-space()='Run']")).click()
        wait.until(lambda d: d.find_element("xpath", "//li[contains(@class, 'lm-Menu-item')]"
                                                     "[normalize-space()='Run All Cells']")).click()

        def finished(driver):
            state = driver.execute_script(NOTEBOOK_STATE)
            if state["tracebacks"]:
                raise AssertionError("a cell failed:\n" + "\n".join(state["tracebacks"]))
            done = state["prompts"] and all(p[1:-2].strip().isdigit() for p in state["prompts"])
            return done and state["kernel"] == "idle"

        WebDriverWait(browser, RUN_TIMEOUT_S, poll_frequency=1).until(finished)
        first = wait.until(lambda d: output_state(d)["figure"] and output_state(d))

        # a caption typed into the text box; Enter sends it (the box does not update on every key)
        caption = browser.find_element("xpath", f"{WIDGET}//div[contains(@class, 'widget-text')]"
                                                "[.//label[normalize-space()='caption']]//input")
        caption.clear()
        caption.send_keys("two children play football on the grass", Keys.ENTER)
        after_text = wait.until(lambda d: (s := output_state(d))["figure"] not in (None, first["figure"]) and s)
        assert not after_text["text"], f"the caption query printed {after_text['text']!r}"

        # an image number, then the "find captions" button
        picker = browser.find_element("xpath", f"{WIDGET}//div[contains(@class, 'widget-text')]"
                                               "[.//label[normalize-space()='image #']]//input")
        picker.send_keys(Keys.CONTROL, "a")
        picker.send_keys("7", Keys.ENTER)
        browser.find_element("xpath", f"{WIDGET}//button[normalize-space()='find captions']").click()
        after_image = wait.until(lambda d: (s := output_state(d))["figure"] not in (None, after_text["figure"]) and s)
        assert not after_image["text"], f"the image query printed {after_image['text']!r}"
        assert after_image["figure"] != first["figure"]
    finally:
        browser.save_screenshot(str(SCREENSHOT))
