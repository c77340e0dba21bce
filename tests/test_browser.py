"""The app in a real browser: ``streamlit run app.py`` driven by Debian's Chromium through Playwright.

Marker ``browser`` (conftest: skipped without /usr/bin/chromium, an error in CI).
Screenshots go to ``$MEDCLASSIFY_SCREENSHOTS`` when it is set.
"""
from __future__ import annotations

import csv
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from medclassify import appsupport as aps
from medclassify.registry import TASKS, get_task

pytestmark = pytest.mark.browser

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FILE_INPUT = 'input[type="file"]'
PREDICTION = '[class*="st-key-prediction_"]'
STARTUP_S = 180
#: Generous for a loaded CI machine; the server-side work is measured in test_appsupport (< 1 s).
RESULT_TIMEOUT_MS = 60_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("streamlit") / "server.log"
    streamlit = Path(sys.executable).with_name("streamlit")
    command = [str(streamlit) if streamlit.exists() else sys.executable, *([] if streamlit.exists() else
               ["-m", "streamlit"]), "run", "app.py", "--server.headless", "true", "--server.address",
               "127.0.0.1", "--server.port", str(port)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"streamlit exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"streamlit not healthy after {STARTUP_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def browser():
    from conftest import require_playwright

    playwright_api = require_playwright()  # skipped without Playwright, an error in CI
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 2200}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(RESULT_TIMEOUT_MS)
    open_app(page, server)
    try:
        yield page
    finally:
        assert "Traceback" not in page.content()
        context.close()


def settle(page) -> None:
    """Wait until the script run has finished (the 'running' indicator is gone)."""
    page.wait_for_timeout(300)
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="detached", timeout=RESULT_TIMEOUT_MS)


def open_app(page, url: str) -> None:
    page.goto(url)
    # the first visit of the server loads the model (TensorFlow import): allow for it
    file_input(page).wait_for(state="attached", timeout=STARTUP_S * 1000)
    settle(page)


def file_input(page, task: str = "blood"):
    """The uploader of one classifier (each has its own: a switch never re-runs the other task's files)."""
    return page.locator(f'.st-key-upload_{task} {FILE_INPUT}')


def choose(page, task: str) -> None:
    if task != "blood":
        page.get_by_text(TASKS[task].title, exact=True).click()
        page.get_by_text(f"Expected input — {TASKS[task].title}").wait_for()
        file_input(page, task).wait_for(state="attached")
        settle(page)


def screenshot(page, name: str) -> None:
    folder = os.environ.get("MEDCLASSIFY_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.wait_for_timeout(1500)  # let the charts draw
        page.screenshot(path=str(Path(folder) / f"{name}.png"))


#: Text of a drawn chart (axis labels, bar labels) that ends outside the chart's own box, which clips it.
CLIPPED_CHART_TEXT_JS = """() => [...document.querySelectorAll('[data-testid="stVegaLiteChart"]')].flatMap(chart => {
    const box = chart.getBoundingClientRect();
    return [...chart.querySelectorAll('svg text')].filter(t => t.textContent.trim()).flatMap(t => {
        const r = t.getBoundingClientRect();
        return r.top < box.top - 1 || r.bottom > box.bottom + 1 ? [t.textContent] : [];
    });
})"""


def clipped_chart_text(page) -> list[str]:
    charts = page.locator('[data-testid="stVegaLiteChart"] svg text')
    charts.first.wait_for(state="attached")
    return page.evaluate(CLIPPED_CHART_TEXT_JS)


def prediction_text(page) -> str:
    element = page.locator(PREDICTION).first
    element.wait_for(state="visible")
    return element.inner_text().strip()


@pytest.mark.parametrize("task", sorted(TASKS))
def test_pick_classifier_upload_and_read_label(page, task):
    choose(page, task)
    # a genuine test image can still be flagged by the OOD rule (about 2% are); those show a warning
    # instead of a label, which test_ood_warning covers
    from medclassify.inference import get_predictor

    predictor = get_predictor(task)
    sample = next(s for s in aps.list_samples(task) if not predictor.predict(s.path.read_bytes()).ood)
    start = time.perf_counter()
    file_input(page, task).set_input_files(str(sample.path))
    text = prediction_text(page)
    elapsed = time.perf_counter() - start
    assert text.startswith("Prediction:")
    label = text.removeprefix("Prediction:").split(" (")[0].strip()  # breast goes on with the threshold rule
    assert label in get_task(task).class_names
    print(f"{task}: '{label}' shown {elapsed:.2f} s after the upload (true class {sample.label})")
    page.get_by_text("Grad-CAM opacity").wait_for()
    # the pictures have accessible names (alt text), not only visible captions
    page.get_by_role("img", name=aps.model_view_alt(predictor.predict(sample.path.read_bytes()))).wait_for()
    explained = "malignant" if task == "breast" else label  # breast: the evidence for malignancy, either way
    page.get_by_role("img", name=f"Grad-CAM heatmap over the model's input, showing where the evidence for "
                                 f"{explained} lay", exact=False).wait_for()
    if task == "breast":
        verdict = page.get_by_text(aps.BREAST_POSITIVE).or_(page.get_by_text(aps.BREAST_NEGATIVE))
        verdict.first.wait_for()
    settle(page)
    assert clipped_chart_text(page) == []
    screenshot(page, f"app_{task}")


def test_corrupt_file_gives_one_line_error(page, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"this is not an image at all")
    file_input(page).set_input_files(str(corrupt))
    alert = page.locator('[data-testid="stAlertContentError"] [data-testid="stMarkdownContainer"]').first
    alert.wait_for()
    message = alert.inner_text().strip()
    assert "corrupt.png" in message and "not a recognised image file" in message
    assert len(message.splitlines()) == 1
    assert page.locator(PREDICTION).count() == 0
    settle(page)
    screenshot(page, "app_error")


def test_ood_warning_in_the_browser(page):
    """A grayscale ultrasound sent to the blood classifier: a warning and no label."""
    file_input(page).set_input_files(str(aps.list_samples("breast")[0].path))
    page.get_by_text("no reliable answer").first.wait_for()
    assert page.get_by_text(aps.UNRELIABLE).count() >= 1
    assert page.locator(PREDICTION).count() == 0
    settle(page)
    screenshot(page, "app_ood")


def test_batch_table_and_csv_download(page, tmp_path):
    choose(page, "breast")
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    files = [str(s.path) for s in aps.list_samples("breast")] + [str(corrupt)]
    file_input(page, "breast").set_input_files(files)
    button = page.get_by_role("button", name="Download results (CSV)")
    button.wait_for()
    settle(page)
    with page.expect_download() as info:
        button.click()
    rows = list(csv.DictReader(io.StringIO(Path(info.value.path()).read_text())))
    assert [r["file"] for r in rows] == [Path(f).name for f in files]
    assert rows[-1]["error"] and not any(r["error"] for r in rows[:-1])
    assert all(r["label"] in get_task("breast").class_names + (aps.NO_ANSWER,) for r in rows[:-1])
    # the file says where its labels came from and what they are not
    assert {r["model"].split(" (")[0] for r in rows} == {"model_breast"}
    assert all("P(malignant) ≥" in r["decision_rule"] and r["note"] == aps.DISCLAIMER for r in rows)
    screenshot(page, "app_batch")


def test_about_the_model_page(page):
    page.get_by_role("tab", name="About the model").click()
    page.get_by_text("Intended use.").wait_for()
    assert page.get_by_text("not a medical device").count() >= 1
    page.get_by_text("Data and licences").wait_for()
    screenshot(page, "app_about")
