"""The web app in a real browser: `python -m opensora_jax.app` started as a user starts it, driven by headless
Chromium (Debian's /usr/bin/chromium through Selenium and /usr/bin/chromedriver; no browser is ever downloaded).

The page loads, a typed prompt and Generate give a video element that plays (duration > 0), and a screenshot is
written (to APP_SCREENSHOT when set: `APP_SCREENSHOT=assets/app_screenshot.png python -m pytest
tests/test_app_browser.py` makes the README's picture). Skipped, with the reason, where Chromium, its driver or
Selenium is missing (.ci/run installs them where it may).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import warnings

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PROMPT = "a red circle moving left"
# This machine's network is closed: nothing that phones home, a fresh profile.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1500", "--autoplay-policy=no-user-gesture-required")

for _path, _what in ((CHROMIUM, "Chromium"), (CHROMEDRIVER, "chromedriver")):
    if not os.access(_path, os.X_OK):
        _reason = (f"the browser test is skipped: {_what} is not at {_path} (Debian: apt-get install chromium "
                   "chromium-driver; .ci/run does it as root)")
        warnings.warn(_reason)  # shown in the run's summary, where a skip's reason is not by default
        pytest.skip(_reason, allow_module_level=True)
pytest.importorskip("gradio")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

START_TIMEOUT_S = 300  # importing jax + gradio and loading the demo model on a busy 2-core machine
GENERATE_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """The app as a user starts it (the one command), on a free port, with a few steps to stay fast."""
    work_dir = tmp_path_factory.mktemp("browser_app")  # videos go to its samples/, as sample.py's would
    log = open(work_dir / "app.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "opensora_jax.app", "--port", str(free_port()), "--steps", "4"],
                            cwd=work_dir, stdout=subprocess.PIPE, stderr=log, text=True,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    try:
        url, deadline = None, time.monotonic() + START_TIMEOUT_S
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            if line.startswith("opensora-app:") and " at http" in line:
                url = line.split(" at ", 1)[1].split()[0]
        if url is None:
            log.seek(0)
            pytest.fail(f"the app did not print its URL (exit {proc.poll()}):\n{log.read()[-3000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def test_a_prompt_typed_in_the_page_gives_a_video_that_plays(app_url, browser, tmp_path):
    browser.get(app_url)
    wait = WebDriverWait(browser, 120)
    prompt = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
    prompt.clear()
    prompt.send_keys(PROMPT)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()

    video = WebDriverWait(browser, GENERATE_TIMEOUT_S).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#result-video video"))
    duration = WebDriverWait(browser, 60).until(
        lambda d: d.execute_script("const v = arguments[0]; return v.readyState >= 1 && v.duration > 0 "
                                   "? v.duration : null;", video))
    assert duration > 0
    browser.execute_script("arguments[0].play();", video)
    played = WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "const v = arguments[0]; return v.currentTime > 0 ? v.currentTime : null;", video))
    assert played > 0
    assert PROMPT in browser.find_element(By.TAG_NAME, "body").text  # the result's settings name its prompt

    shot = tmp_path / "app.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("APP_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["APP_SCREENSHOT"])

    # A mistake is shown in the page. (clear() would not tell the page's script that the text changed.)
    prompt.send_keys(Keys.CONTROL, "a")
    prompt.send_keys(Keys.DELETE)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    WebDriverWait(browser, 60).until(lambda d: "the prompt is empty" in d.find_element(By.TAG_NAME, "body").text)
