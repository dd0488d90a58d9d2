"""Notebook 06 as a person uses it: JupyterLab in headless Chromium, Run All, move controls.

Starts JupyterLab on 127.0.0.1 (random free port, a token) on a temporary copy of notebook 06
(so that autosave never touches the tracked one), opens it in Debian's ``chromium`` through
Playwright (``executable_path``; Playwright downloads no browser), runs all cells from the
menu, then moves controls and types phrases, and checks what the page shows: the explorer
is on the preset, its overlay lies inside a 1366x768 window, each control redraws the map
within 2 s, a typed phrase redraws both maps, no widget error or traceback appears. If the
widgets' JavaScript does not load, no overlay ever appears and the test fails.

Screenshots and a timing log go to ``outputs/explorer-browser/`` (git-ignored). The
server and its kernels are stopped at the end, also after a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("LDMGROUND_CHROMIUM", "/usr/bin/chromium"))
ARTEFACTS = ROOT / "outputs" / "explorer-browser"
VIEWPORT = {"width": 1366, "height": 768}
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PARAMETERS = {  # the notebook's parameters cell in the copy: the phantom set, few samples
    "dataset": repr(str(ROOT / "data" / "phantom" / "test.csv")),
    "images": repr(str(ROOT / "data" / "phantom")),
    "n_samples": "4",
}

pytestmark = pytest.mark.browser


def _require_browser():
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("Playwright for Python is not installed (pip install playwright; the test extra has it)")
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install -y chromium; or set LDMGROUND_CHROMIUM)")
    if shutil.which("jupyter", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("JupyterLab is not installed next to this Python")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook_copy(folder: Path) -> Path:
    """Notebook 06 with the parameters cell pointed at the phantom set by absolute paths."""
    nb = json.loads((ROOT / "notebooks" / "06_explorer.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    lines = []
    for line in "".join(cell["source"]).splitlines():
        name = line.split("=")[0].strip()
        lines.append(f"{name} = {PARAMETERS[name]}" if name in PARAMETERS else line)
    cell["source"] = "\n".join(lines)
    path = folder / "06_explorer.ipynb"
    path.write_text(json.dumps(nb))
    return path


def _api(url: str, token: str, method: str = "GET"):
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        body = resp.read()
    return json.loads(body) if body else None


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on a copy of notebook 06; every kernel and the server stopped after."""
    _require_browser()
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    _notebook_copy(notebooks)
    port, token = _free_port(), os.urandom(16).hex()
    home = tmp_path / "jupyter"
    settings = home / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    env = dict(
        os.environ,
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_DATA_DIR=str(home / "data"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
        IPYTHONDIR=str(home / "ipython"),
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    cmd = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={notebooks}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
        "--ServerApp.terminals_enabled=False",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI containers run as root
        cmd.append("--allow-root")
    log = open(tmp_path / "jupyterlab.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _api(f"{base}/api/status", token)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    text = (tmp_path / "jupyterlab.log").read_text()
                    raise RuntimeError(f"JupyterLab did not start: {text}") from None
                time.sleep(0.3)
        yield {"base": base, "token": token, "notebooks": notebooks}
    finally:
        try:
            for kernel in _api(f"{base}/api/kernels", token) or []:
                _api(f"{base}/api/kernels/{kernel['id']}", token, "DELETE")
        except OSError:
            pass
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)  # the server's own process group only
            server.wait()
        log.close()


def _wait_for_kernel(lab, timeout: float) -> None:
    """Until the page is connected to an idle kernel (Run All before that runs nothing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            kernels = _api(f"{lab['base']}/api/kernels", lab["token"]) or []
        except OSError:  # the server can fail to list a kernel that is still starting
            kernels = []
        if any(k["execution_state"] == "idle" and k.get("connections", 0) > 0 for k in kernels):
            return
        time.sleep(0.2)
    raise AssertionError(f"no kernel connected and idle within {timeout} s")


def _wait_inversions(page, n: int, timeout: float = 60.0) -> None:
    """Until the status reports ``n`` inversions and the redraw after the last of them."""
    page.wait_for_function(
        f"() => document.querySelector('.ldmground-status').innerText.includes('inversions so far: {n}')",
        timeout=timeout * 1000,
    )


def _shot(locator) -> bytes:
    return locator.screenshot(animations="disabled")


def _wait_change(page, locator, before: bytes, timeout: float) -> float:
    """Seconds until ``locator``'s pixels differ from ``before``; fails after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if _shot(locator) != before:
            return time.monotonic() - start
        page.wait_for_timeout(40)
    raise AssertionError(f"the displayed map did not change within {timeout} s")


def _page_problems(page) -> list[str]:
    text = "\n".join(page.locator(".jp-Notebook .jp-OutputArea").all_inner_texts())
    bad = ["Traceback", "Error displaying widget", "Failed to load", "Loading weights", "widget error"]
    return [b for b in bad if b in text]


def test_explorer_in_jupyterlab(lab):
    from playwright.sync_api import sync_playwright

    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.monotonic()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(f"{lab['base']}/lab/tree/06_explorer.ipynb?token={lab['token']}")
            page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=60_000)
            # a fresh JupyterLab asks which kernel to start; take the notebook's own (Python 3)
            idle = page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")
            dialog = page.locator(".jp-Dialog")
            idle.or_(dialog).first.wait_for(timeout=60_000)
            if dialog.count():
                dialog.get_by_role("button", name="Select").click()
            _wait_for_kernel(lab, timeout=60)
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.locator("li[data-command='runmenu:run-all']").click()
            run_all = time.monotonic()
            maps = page.locator(".ldmground-explorer img.ldmground-map")
            # the overlays never appear if the widgets' JavaScript does not load
            maps.first.wait_for(state="attached", timeout=60_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
            page.wait_for_timeout(500)
            timings["run_all_s"] = time.monotonic() - run_all
            page.screenshot(path=str(ARTEFACTS / "after_run_all.png"))
            assert _page_problems(page) == []
            assert maps.count() == 2

            # one screen, with no scrolling after Run All: the explorer brings itself to the
            # top of the window, and both overlays and every control lie inside 1366x768
            maps.first.wait_for(state="visible", timeout=5_000)
            page.wait_for_timeout(600)
            page.screenshot(path=str(ARTEFACTS / "explorer.png"))
            shown = [maps.nth(0), maps.nth(1)] + [
                page.locator(f".ldmground-{name}")
                for name in ("sample", "phrase", "compare", "layers", "steps", "tokens", "sigma", "otsu", "contrast")
            ]
            for item in shown:
                box = item.bounding_box()
                assert box is not None and box["width"] > 20
                assert box["x"] >= 0 and box["y"] >= 0, box
                assert box["x"] + box["width"] <= VIEWPORT["width"], box
                assert box["y"] + box["height"] <= VIEWPORT["height"], box
            # Run All leaves the explorer on the preset (demo: sigma 32, contrast 0.80)
            assert page.locator(".ldmground-sigma .widget-readout").inner_text().strip() == "32.0"
            assert page.locator(".ldmground-contrast .widget-readout").inner_text().strip() == "0.80"
            status = page.locator(".ldmground-status")
            assert "redraw" in status.inner_text()

            first, second = maps.nth(0), maps.nth(1)
            metrics = page.locator(".ldmground-metrics").nth(0)

            def moved(name: str, action, timeout: float = 2.0) -> None:
                """Act, wait (at most ``timeout``) for the map to change; log the browser's and
                the kernel's (status: "redraw X s") times."""
                before = _shot(first)
                action()
                timings[name] = _wait_change(page, first, before, timeout)
                page.wait_for_function(
                    "() => document.querySelector('.ldmground-status').innerText.startsWith('redraw')", timeout=2000
                )
                timings[name.replace("_s", "_redraw_s")] = float(status.inner_text().split()[1])

            sigma = page.locator(".ldmground-sigma .noUi-handle")
            moved("sigma_s", lambda: (sigma.focus(), page.keyboard.press("ArrowLeft")))
            assert page.locator(".ldmground-sigma .widget-readout").inner_text().strip() == "24.0"
            moved("otsu_s", lambda: page.locator(".ldmground-otsu input[type=checkbox]").click())
            moved("pooling_s", lambda: page.locator(".ldmground-pooling button", has_text="max").click())
            handle = page.locator(".ldmground-contrast .noUi-handle")
            hb = handle.bounding_box()

            def drag_contrast():
                page.mouse.move(hb["x"] + hb["width"] / 2, hb["y"] + hb["height"] / 2)
                page.mouse.down()
                page.mouse.move(hb["x"] - 80, hb["y"] + hb["height"] / 2, steps=5)
                page.mouse.up()

            moved("contrast_s", drag_contrast)
            assert page.locator(".ldmground-contrast .widget-readout").inner_text().strip() != "0.80"
            page.screenshot(path=str(ARTEFACTS / "after_controls.png"))

            # a typed phrase on the image already inverted: both maps follow the words
            phrase = page.locator(".ldmground-phrase input")
            typed = "Right lower lobe opacity"
            assert phrase.input_value() != typed
            before_a, before_b, before_m = _shot(first), _shot(second), metrics.inner_text()
            t0 = time.monotonic()
            phrase.fill(typed)
            phrase.press("Enter")
            _wait_inversions(page, 2)
            timings["typed_phrase_s"] = time.monotonic() - t0
            assert _shot(first) != before_a and _shot(second) != before_b, "the maps did not follow the typed phrase"
            assert page.locator(".ldmground-compare input").input_value() == "Left lower lobe opacity"
            assert metrics.inner_text() != before_m
            page.screenshot(path=str(ARTEFACTS / "after_phrase.png"))

            # a new sample: the view says it is working, and then shows that sample everywhere
            page.locator(".ldmground-sample select").select_option(index=1)
            page.locator(".ldmground-progress").wait_for(state="visible", timeout=5_000)
            page.screenshot(path=str(ARTEFACTS / "working.png"))
            assert page.locator(".ldmground-sample select").is_disabled()
            assert "working" in page.locator(".ldmground-caption").nth(0).inner_text()
            t0 = time.monotonic()
            _wait_inversions(page, 3)
            timings["new_sample_s"] = time.monotonic() - t0
            assert page.locator(".ldmground-progress").is_hidden()
            assert all(c.startswith("#1 ") for c in page.locator(".ldmground-caption").all_inner_texts())

            # no layer selected: the maps are cleared and the view says what to do
            before = _shot(first)
            options = page.locator(".ldmground-layers select option")
            chosen = [i for i in range(options.count()) if options.nth(i).evaluate("o => o.selected")]
            for i in chosen:  # ctrl-click each selected layer off, as a person would
                options.nth(i).click(modifiers=["Control"])
            _wait_change(page, first, before, 2.0)
            page.wait_for_function(
                "() => document.querySelector('.ldmground-status').innerText.includes('No layer selected')",
                timeout=2000,
            )
            assert "—" in metrics.inner_text()
            page.screenshot(path=str(ARTEFACTS / "no_layer.png"))
            assert _page_problems(page) == []
        except Exception:
            page.screenshot(path=str(ARTEFACTS / "failure.png"))
            (ARTEFACTS / "failure.html").write_text(page.content())
            raise
        finally:
            browser.close()
    timings["total_s"] = time.monotonic() - start
    (ARTEFACTS / "timings.json").write_text(json.dumps({k: round(v, 3) for k, v in timings.items()}, indent=1))
    print("explorer browser timings:", {k: round(v, 2) for k, v in timings.items()})
