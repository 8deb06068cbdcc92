"""The web demo served for real: `dina app` on loopback driven by Debian's headless Chromium (Playwright pointed at
/usr/bin/chromium, never a downloaded browser), and the exported Space's app.py starting and serving the same page.

`DINA_APP_SCREENSHOTS=docs/app pytest tests/test_app_server.py -s` also writes the README's screenshots there.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STARTUP_TIMEOUT_S = 300  # model loading on a loaded 2-core machine
PROMPT = "two red circles"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(command: list[str], cwd, log: Path, env: dict) -> tuple[subprocess.Popen, str]:
    """Start a server on a free loopback port (`port` is passed in GRADIO_SERVER_PORT); wait for its page."""
    port = _free_port()
    env = {**os.environ, **env, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port)}
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    command = [c.replace("{port}", str(port)) for c in command]
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(1)
    _stop(process)
    pytest.fail(f"the server did not answer within {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    log = tmp_path_factory.mktemp("app") / "server.log"
    repo = Path(__file__).parent.parent
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "modeling_dina.cli", "app", "--host", "127.0.0.1", "--port", "{port}"]
    process, url = _serve(command, repo, log, env)
    yield url
    _stop(process)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium package")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shapes_images(tmp_path_factory):
    """A render that satisfies the prompt and one with the wrong colour."""
    from modeling_dina.shapes.render import render

    folder = tmp_path_factory.mktemp("images")
    paths = [folder / "complies.png", folder / "wrong_colour.png"]
    render(PROMPT, seed=1).save(paths[0])
    render(PROMPT, seed=2, violations=("colour",)).save(paths[1])
    return [str(p) for p in paths]


def _screenshot(page, tmp_path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    target = os.environ.get("DINA_APP_SCREENSHOTS")
    if target:
        os.makedirs(target, exist_ok=True)
        shutil.copy(path, os.path.join(target, path.name))


def _ranking(page) -> list[tuple[str, float]]:
    rows = page.query_selector_all("#score-ranking table tbody tr")
    cells = [[td.inner_text().strip() for td in row.query_selector_all("td")] for row in rows]
    return [(c[1], float(c[2])) for c in cells]


def _score(page, heading: str, timeout_ms: int = 180_000) -> float:
    """Press Score and wait for a ranking under `heading`; seconds from the click to the ranking on the page."""
    start = time.perf_counter()
    page.click("#score-button")
    page.wait_for_selector(f"#score-ranking:has-text('{heading}') table", timeout=timeout_ms)
    return time.perf_counter() - start


def test_browser_scores_compares_and_generates(app_url, browser, shapes_images, tmp_path):
    from modeling_dina.app.models import load_models

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(app_url)
    page.wait_for_selector("#score-prompt textarea", timeout=60_000)

    # Score: type a prompt, upload two images, press score, read the ranking from the page.
    page.fill("#score-prompt textarea", PROMPT)
    page.set_input_files("#score-images input[type=file]", shapes_images)
    page.wait_for_selector("#score-images td.filename[aria-label='wrong_colour.png']", timeout=30_000)
    first = _score(page, "Ranked by the reward")
    ranking = _ranking(page)
    reward = load_models().reward
    direct = reward(PROMPT, images=shapes_images, noise_level=reward.reward_model.config.noise_level_images).rewards
    names = [Path(p).name for p in shapes_images]
    assert [name for name, _ in ranking] == [names[i] for i in direct.argsort(descending=True).tolist()]
    for name, value in ranking:
        assert value == pytest.approx(direct[names.index(name)].item(), abs=2e-3)
    assert len(page.query_selector_all("#score-gallery img")) >= 2
    page.wait_for_selector("#score-plot img, #score-plot svg", timeout=30_000)
    _screenshot(page, tmp_path, "score")
    page.get_by_label("Rank by the ensemble").check()
    again = _score(page, "Ranked by the ensemble reward")
    levels = reward.reward_model.config.ensemble_noise_levels
    ensemble = reward(PROMPT, images=shapes_images, noise_levels=levels).rewards
    assert [name for name, _ in _ranking(page)] == [names[i] for i in ensemble.argsort(descending=True).tolist()]
    print(f"\nscore of 2 images in the page: first {first:.2f} s, again (ranked by the ensemble) {again:.2f} s")

    # Compare: P(a > b) with its noise level.
    page.get_by_role("tab", name="Compare").click()
    page.fill("#compare-prompt textarea", PROMPT)
    page.set_input_files("#compare-a input[type=file]", shapes_images[0])
    page.set_input_files("#compare-b input[type=file]", shapes_images[1])
    page.wait_for_selector("#compare-b img", timeout=30_000)
    page.click("#compare-button")
    page.wait_for_selector("#compare-result strong", timeout=120_000)
    text = page.inner_text("#compare-result")
    p = reward.compare(PROMPT, shapes_images[0], shapes_images[1])
    shown = re.search(r"P\(A > B\) = ([0-9.]+)", text)
    assert shown and float(shown.group(1)) == pytest.approx(p, abs=2e-4)
    assert "noise level u=0.1" in text
    _screenshot(page, tmp_path, "compare")

    # Shapes world: N candidates ranked in latent space, the checker's verdict under each.
    page.get_by_role("tab", name="Shapes world").click()
    start = time.perf_counter()
    page.click("#shapes-button")
    page.wait_for_selector("#shapes-summary strong", timeout=180_000)
    print(f"Shapes world, 4 candidates generated and ranked: {time.perf_counter() - start:.2f} s")
    assert "of 4 candidates comply" in page.inner_text("#shapes-summary")
    captions = page.inner_text("#shapes-base")
    assert captions.count("reward") == 4 and ("complies" in captions or "violates" in captions)
    _screenshot(page, tmp_path, "shapes")

    # Errors are messages in the page, never a stack trace.
    page.get_by_role("tab", name="Score").click()
    page.fill("#score-prompt textarea", "")
    page.click("#score-button")
    page.wait_for_selector(".toast-body:has-text('Type a prompt first.')", timeout=30_000)
    assert "Traceback" not in page.content()
    page.close()


def test_exported_space_serves_the_app(tmp_path):
    """The Space folder's app.py, run as Spaces run it (`python app.py`, host and port from the environment), serves
    the same page from its own copy of the package."""
    from modeling_dina.app.space import export_space

    space = export_space(tmp_path / "space")
    env = {"PYTHONPATH": ""}  # the Space's own copy of the package, next to app.py
    process, url = _serve([sys.executable, "app.py"], space, tmp_path / "space.log", env)
    try:
        with urllib.request.urlopen(url + "config", timeout=30) as response:
            config = json.load(response)
    finally:
        _stop(process)
    labels = {c.get("props", {}).get("label") for c in config["components"]}
    assert {"Score", "Compare", "Shapes world"} <= labels
