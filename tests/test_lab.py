"""The notebooks as people use them: JupyterLab in a real (headless) browser, every cell run,
then the sliders and the dropdown moved and the figure under them checked to have changed.

nbval and papermill never render a widget; this does. JupyterLab runs on 127.0.0.1 with a
token, on copies of the notebooks prepared for the `smoke` profile (fake MNIST, seconds of
training); Playwright drives Debian's Chromium (`DDPM_CHROMIUM`, default /usr/bin/chromium;
no browser download). Screenshots go to build/lab-screenshots/. Marked `browser`:
`make test-browser` (part of `make test`) installs Chromium with apt-get when it is missing,
and the tests skip, saying why, where Chromium or Playwright is not there.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "build" / "lab-screenshots"
CHROMIUM = os.environ.get("DDPM_CHROMIUM", "/usr/bin/chromium")
# As root in a container, and without the background services that a closed network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
RUN_ALL_TIMEOUT_MS = 300_000  # "run all" of one notebook on smoke, its training included
WIDGET_MANAGER = "@jupyter-widgets/jupyterlab-manager"
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook on show

try:
    from playwright import sync_api
except ImportError:  # the tests skip, below, rather than fail to import
    sync_api = None


def why_no_browser() -> str | None:
    """Why the browser tests cannot run here (skipped, not failed, so `make test` stays green)."""
    if sync_api is None:
        return "Playwright is not installed: pip install -e '.[test]'"
    if not Path(CHROMIUM).is_file():
        return (f"no Chromium at {CHROMIUM}: `make test-browser` installs Debian's package with apt-get "
                f"(as root or with sudo), or point `make test-browser CHROMIUM=...` at a Chromium binary")
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_settings(home: Path, disabled: tuple[str, ...] = ()) -> dict[str, str]:
    """A JupyterLab of its own: fresh settings and workspaces (nothing restored from the user's),
    every cell kept in the page (no windowing, so each cell's prompt can be read), no news
    prompt, and `disabled` extensions switched off. Returns the environment that points there."""
    settings = home / "settings"
    for plugin, values in {"@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
                           "@jupyterlab/apputils-extension/notification": {"fetchNews": "false"}}.items():
        path = settings / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    config = home / "config"
    (config / "labconfig").mkdir(parents=True, exist_ok=True)
    (config / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {name: True for name in disabled}}))
    return {"JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
            "JUPYTER_CONFIG_DIR": str(config)}


def refused_without_token(url: str) -> int:
    """The HTTP status of the contents API asked without the token (403 when auth is on)."""
    try:
        with urllib.request.urlopen(f"{url}/api/contents", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as refused:
        return refused.code


class Lab:
    """JupyterLab on 127.0.0.1 with a fresh token, in its own process group; `close` stops it
    and every kernel it started."""

    def __init__(self, root: Path, home: Path, disabled: tuple[str, ...] = ()):
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = home / "jupyterlab.log"
        command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                   f"--ServerApp.port={self.port}", f"--IdentityProvider.token={self.token}",
                   f"--ServerApp.root_dir={root}", "--LabApp.news_url=", "--ServerApp.port_retries=0"]
        if os.geteuid() == 0:
            command.append("--allow-root")  # CI's containers run as root
        env = {**os.environ, **write_settings(home, disabled)}
        self._log = self.log_path.open("w")
        self.server = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)

    def wait_until_up(self, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=2):
                    return
            except OSError:
                if self.server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start; its log: {self.log_path}") from None
                time.sleep(0.5)

    def wait_for_kernel(self, notebook: str, timeout_s: float = 90) -> None:
        """Until the notebook's kernel has started and is idle (asked of the server's REST API)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"{self.url}/api/sessions?token={self.token}", timeout=5) as response:
                sessions = json.load(response)
            if any(s["path"].endswith(notebook) and (s.get("kernel") or {}).get("execution_state") == "idle"
                   for s in sessions):
                return
            time.sleep(0.5)
        raise AssertionError(f"{notebook}: its kernel did not start within {timeout_s:.0f} s; log {self.log_path}")

    def close(self) -> None:
        if self.server.poll() is None:
            os.killpg(self.server.pid, signal.SIGTERM)  # the server and the kernels it started
            try:
                self.server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.server.pid, signal.SIGKILL)
                self.server.wait()
        self._log.close()


@contextlib.contextmanager
def start_lab(root: Path, home: Path, disabled: tuple[str, ...] = ()):
    lab = Lab(root, home, disabled)
    try:
        lab.wait_until_up()
        code = refused_without_token(lab.url)
        assert code == 403, f"JupyterLab answered {code} without its token: token authentication must stay on"
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The notebooks with the smoke profile's parameters injected, beside fake MNIST."""
    root = tmp_path_factory.mktemp("lab")
    subprocess.run([sys.executable, str(ROOT / "tests" / "fake_data.py"), str(root / "data")], check=True)
    subprocess.run([sys.executable, "-m", "ddpm_core", "notebooks", "--prepare-only", "--no-progress",
                    "--notebooks", str(ROOT / "notebooks"), "--out", str(root / "notebooks"), "--profile", "smoke",
                    "-p", "data_root", str(root / "data"), "-p", "runs_root", str(root / "runs"),
                    "-p", "figures_dir", str(root / "figures"), "-p", "num_samples", "4", "-p", "compare_samples", "2",
                    "-p", "sampler_steps", "5", "-p", "free_guidance", "False", "-p", "fid_samples", "4"],
                   check=True, capture_output=True)
    return root / "notebooks"


@pytest.fixture(scope="module")
def lab(workspace, tmp_path_factory):
    with start_lab(workspace, tmp_path_factory.mktemp("lab-home")) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    if reason := why_no_browser():
        pytest.skip(reason)
    shutil.rmtree(SHOTS, ignore_errors=True)  # only this run's screenshots
    SHOTS.mkdir(parents=True)
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def open_and_run_all(browser, lab: Lab, name: str):
    """Open notebook `name` in JupyterLab, run all its cells from the Run menu, and wait until
    every code cell has its execution count (or one failed, which fails the test)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    # a workspace of its own, so that no other notebook is restored beside it
    page.goto(f"{lab.url}/lab/workspaces/{Path(name).stem}/tree/{name}?reset&token={lab.token}")
    page.locator(f"{PANEL} .jp-CodeCell").first.wait_for(timeout=90_000)
    lab.wait_for_kernel(name)  # "Run All" before the kernel is up asks which kernel to start
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    try:
        page.wait_for_function(
            """panel => {
                const text = [...document.querySelectorAll(`${panel} .jp-OutputArea-output`)]
                             .map(o => o.textContent).join('\\n');
                if (text.includes('Traceback (most recent call last)')) return true;
                // a collapsed cell (the notebooks' solutions) shows a placeholder whose prompt stays empty
                const prompts = [...document.querySelectorAll(`${panel} .jp-CodeCell .jp-InputPrompt`)]
                                .filter(p => !p.closest('.jp-InputPlaceholder'));
                return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
            }""", arg=PANEL, timeout=RUN_ALL_TIMEOUT_MS, polling=1000)
    except sync_api.TimeoutError:
        page.screenshot(path=str(SHOTS / f"{Path(name).stem}_timeout.png"), full_page=True)
        raise AssertionError(f"{name}: the cells did not all run within {RUN_ALL_TIMEOUT_MS / 1000:.0f} s; "
                             f"screenshot {SHOTS / (Path(name).stem + '_timeout.png')}") from None
    failed = [text for text in page.locator(f"{PANEL} .jp-OutputArea-output").all_inner_texts()
              if "Traceback (most recent call last)" in text]
    if failed:
        page.screenshot(path=str(SHOTS / f"{Path(name).stem}_error.png"), full_page=True)
        raise AssertionError(f"{name}: a cell failed in JupyterLab:\n{failed[0][-3000:]}")
    return page


def find_widget(page, name: str, control: str, timeout_ms: float = 30_000):
    """The rendered widget (a VBox of controls above a figure) holding `control`, a CSS selector;
    a clear failure, with a screenshot, when JupyterLab did not render it."""
    widget = page.locator(f"{PANEL} .jp-OutputArea-output .widget-vbox", has=page.locator(control)).first
    try:
        widget.wait_for(timeout=timeout_ms)
    except sync_api.TimeoutError:
        shot = SHOTS / f"{Path(name).stem}_no_widget.png"
        page.screenshot(path=str(shot), full_page=True)
        texts = page.locator(f"{PANEL} .jp-OutputArea-output").all_inner_texts()
        shown = next((t for t in texts if "VBox(" in t or "Error displaying widget" in t
                      or "Loading widget" in t), "no output at all")
        raise AssertionError(
            f"{name}: the widget ({control}) did not render in JupyterLab; in its place: {shown[:300]!r}. "
            f"JupyterLab needs the widget manager ({WIDGET_MANAGER}, from the jupyterlab_widgets package that "
            f"ipywidgets>=8 installs) enabled in the environment it runs from: "
            f"`jupyter labextension list` shows it. Screenshot: {shot}") from None
    widget.scroll_into_view_if_needed()
    return widget


def figure_shot(widget, path: Path) -> bytes:
    """A screenshot of the figure under the controls (not of the controls themselves, which
    change whenever they move) once it is drawn."""
    figure = widget.locator(".widget-output img").first
    figure.wait_for(timeout=60_000)
    return figure.screenshot(path=str(path))


def figure_source(widget) -> str:
    return widget.locator(".widget-output img").first.get_attribute("src") or ""


def move_slider(widget, key: str) -> tuple[str, str]:
    """Move the slider's handle with the keyboard, as a person can (Home/End: first/last value).
    Returns the value it showed before and after."""
    handle = widget.locator(".noUi-handle").first
    readout = widget.locator(".widget-readout").first
    before = readout.inner_text()
    handle.focus()
    handle.press(key)
    widget.page.wait_for_function("([el, old]) => el.textContent !== old", arg=[readout.element_handle(), before],
                                  timeout=10_000)
    return before, readout.inner_text()


def redrawn(widget, old_source: str, before: bytes, path: Path, what: str, timeout_s: float = 120) -> bytes:
    """Wait until the kernel has drawn a new figure under the widget; its screenshot must differ."""
    try:
        widget.page.wait_for_function(
            "([el, old]) => { const img = el.querySelector('.widget-output img'); return img && img.src !== old; }",
            arg=[widget.element_handle(), old_source], timeout=timeout_s * 1000, polling=250)
    except sync_api.TimeoutError:
        widget.screenshot(path=str(path))
        raise AssertionError(f"the figure under the widget was not redrawn within {timeout_s:.0f} s after {what}; "
                             f"screenshot {path}") from None
    widget.page.wait_for_timeout(300)  # let the new image decode before the screenshot
    after = figure_shot(widget, path)
    assert after != before, f"after {what} the figure's screenshot is unchanged; see {path}"
    return after


@pytest.mark.parametrize("name", ["01_forward_noising.ipynb", "03_reverse_process.ipynb"])
def test_the_timestep_slider_redraws_the_figure(browser, lab, name):
    """01: t over x_t and its pixel histogram; 03: t along the reverse chain (x_t, x0 pred)."""
    prefix = name[:2]
    page = open_and_run_all(browser, lab, name)
    widget = find_widget(page, name, ".widget-slider")
    source, before = figure_source(widget), figure_shot(widget, SHOTS / f"{prefix}_t_first.png")
    old, new = move_slider(widget, "End")
    redrawn(widget, source, before, SHOTS / f"{prefix}_t_last.png", f"moving t from {old} to {new}")
    widget.screenshot(path=str(SHOTS / f"{prefix}_widget.png"))
    page.close()


def test_guidance_digit_and_scale_redraw_the_samples(browser, lab):
    page = open_and_run_all(browser, lab, "04_classifier_guidance.ipynb")
    widget = find_widget(page, "04_classifier_guidance.ipynb", ".widget-dropdown select")
    source, before = figure_source(widget), figure_shot(widget, SHOTS / "04_first.png")
    select = widget.locator(".widget-dropdown select").first
    digit = "3" if select.input_value() != "3" else "7"
    select.select_option(digit)
    after_digit = redrawn(widget, source, before, SHOTS / f"04_digit_{digit}.png", f"choosing digit {digit}")
    source = figure_source(widget)
    old, new = move_slider(widget, "Home")
    redrawn(widget, source, after_digit, SHOTS / f"04_digit_{digit}_scale_{new}.png",
            f"moving the guidance scale from {old} to {new}")
    widget.screenshot(path=str(SHOTS / "04_widget.png"))
    page.close()


def test_missing_widget_manager_fails_with_the_fix(browser, tmp_path):
    """Without the widget manager JupyterLab shows the widget's text; the check says what to fix."""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "from ddpm_core.widgets import figure_slider\n"
        "from ddpm_core.plotting import plot_image_grid\n"
        "import torch\n"
        "figure_slider(lambda k: plot_image_grid(torch.full((1, 1, 8, 8), k / 2 - 1)), [0, 1, 2])")])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(notebook, tmp_path / "slider.ipynb")
    with start_lab(tmp_path, tmp_path / "home", disabled=(WIDGET_MANAGER,)) as lab:
        page = open_and_run_all(browser, lab, "slider.ipynb")
        with pytest.raises(AssertionError, match="did not render.*jupyterlab-manager") as failure:
            find_widget(page, "slider.ipynb", ".widget-slider", timeout_ms=5_000)
        assert "VBox(" in str(failure.value)  # what a person sees in place of the slider
        page.close()


# The text of the rendered markdown cells left untypeset: typeset math, code spans and code blocks
# removed, what still holds $$, $...$ or a LaTeX command.
RAW_MATH = """panel => [...document.querySelectorAll(`${panel} .jp-MarkdownCell .jp-RenderedMarkdown`)].map(cell => {
    const copy = cell.cloneNode(true);
    copy.querySelectorAll('mjx-container, code, pre').forEach(node => node.remove());
    return copy.textContent;
}).filter(text => /\\$\\$|\\$[^$\\s][^$]*\\$|\\\\(frac|mathcal|bar|alpha|beta|epsilon|theta|sqrt|text)\\b/.test(text))"""


def open_typeset(browser, lab: Lab, folder: Path, name: str, timeout_ms: float = 90_000):
    """Open notebook `name` (its cells not run) and wait until MathJax has typeset every display
    equation of its markdown and left no math as raw text; else fail with what is left and a
    screenshot. Returns the page."""
    sources = [cell.source for cell in nbformat.read(folder / name, as_version=4).cells if cell.cell_type == "markdown"]
    display_math = sum(source.count("$$") // 2 for source in sources)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{lab.url}/lab/workspaces/math-{Path(name).stem}/tree/{name}?reset&token={lab.token}")
    page.locator(f"{PANEL} .jp-MarkdownCell .jp-RenderedMarkdown").first.wait_for(timeout=90_000)
    try:
        page.wait_for_function(
            f"""([panel, wanted]) => document.querySelectorAll(`${{panel}} mjx-container[display="true"]`).length >= wanted
                && ({RAW_MATH})(panel).length === 0""", arg=[PANEL, display_math], timeout=timeout_ms, polling=500)
    except sync_api.TimeoutError:
        shot = SHOTS / f"{Path(name).stem}_math_raw.png"
        page.screenshot(path=str(shot))
        typeset = page.locator(f'{PANEL} mjx-container[display="true"]').count()
        raw = page.evaluate(RAW_MATH, PANEL)
        raise AssertionError(f"{name}: {typeset} of {display_math} display equations typeset by MathJax; left as "
                             f"text: {[text[:120] for text in raw][:2]}; screenshot {shot}") from None
    return page


def test_the_math_is_typeset(browser, lab, workspace):
    """Notebook 02, the most math (the bound, Eqs. (5)-(14)), opened as a learner opens it; a
    screenshot of the bound's derivation."""
    page = open_typeset(browser, lab, workspace, "02_training.ipynb")
    inline = page.locator(f'{PANEL} mjx-container:not([display="true"])').count()
    assert inline > 50, f"only {inline} inline formulas typeset in notebook 02"
    heading = page.locator("h2", has_text=re.compile("From the variational bound"))  # Section 3, not the title
    bound = page.locator(f"{PANEL} .jp-MarkdownCell", has=heading).first
    bound.scroll_into_view_if_needed()
    bound.screenshot(path=str(SHOTS / "02_math_bound.png"))
    page.close()


def test_math_left_raw_fails_the_check(browser, tmp_path):
    """Without JupyterLab's MathJax the formulas stay text, and the check says so."""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(
        "The bound, $L_T$:\n\n$$x_t = \\sqrt{\\bar\\alpha_t}\\,x_0$$\n\nand `$HOME` stays code.")])
    nbformat.write(notebook, tmp_path / "math.ipynb")
    with start_lab(tmp_path, tmp_path / "home", disabled=("@jupyterlab/mathjax-extension",)) as lab:
        with pytest.raises(AssertionError, match=r"0 of 1 display equations typeset.*sqrt") as failure:
            open_typeset(browser, lab, tmp_path, "math.ipynb", timeout_ms=10_000)
        assert "HOME" not in str(failure.value)  # code spans are not math
