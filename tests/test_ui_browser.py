"""End to end in a real browser: the results plugin inside Airflow's UI.

The pipeline trains and publishes one tiny run through `airflow dags test`;
a real `airflow api-server` (SQLite, simple auth manager, one admin user)
serves the UI under a base_url sub-path with the plugin loaded; headless Chromium (Debian's `chromium`
and `chromium-driver`, driven by Selenium; nothing is downloaded) logs in,
opens Browse -> AlexNet runs, the run's page, the compare page, the champion
history, the promote page (whose button triggers ``alexnet_cifar10_promote``
through Airflow's REST API) and the DAG run's Results tab.

Screenshots go to the test's folder, and to ``$ALEXNET_UI_SCREENSHOTS`` when
set. ``$ALEXNET_UI_ARCHIVE`` and ``$ALEXNET_UI_ARCHIVE_MD5`` train on another
archive than the tests' small one, and ``$ALEXNET_UI_CONF`` (JSON) overrides
the run's params: ``scripts/ui_screenshots.sh`` makes docs/images/ that way,
from a short run on the real CIFAR-10.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

from conftest import ROOT, airflow_bin, airflow_env

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PASSWORD = "browser-test-password"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def request(url: str, token: str | None = None, data: dict | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    body = json.dumps(data).encode() if data is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture(scope="module")
def server(small_archive, tmp_path_factory):
    """A run trained and published by the pipeline, and an api-server with the plugin: (base URL, env, run id)."""
    folder = tmp_path_factory.mktemp("ui")
    artifacts = folder / "artifacts"
    (folder / "passwords.json").write_text(json.dumps({"admin": PASSWORD}))
    port = free_port()
    env = airflow_env(
        folder / "home", artifacts,
        AIRFLOW__CORE__PLUGINS_FOLDER=str(ROOT / "plugins"),
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="admin:admin",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(folder / "passwords.json"),
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{port}/airflow",  # a sub-path: the plugin's links are relative
        AIRFLOW__API__WORKERS="1",
        AIRFLOW__API_AUTH__JWT_SECRET="browser-test-jwt-secret",
        AIRFLOW__API__SECRET_KEY="browser-test-secret-key",
        ALEXNET_TENSORBOARD_URL="http://127.0.0.1:6006",
    )
    subprocess.run([airflow_bin(), "db", "migrate"], env=env, check=True, capture_output=True)
    path, md5 = small_archive
    if os.environ.get("ALEXNET_UI_ARCHIVE"):
        path, md5 = Path(os.environ["ALEXNET_UI_ARCHIVE"]), os.environ["ALEXNET_UI_ARCHIVE_MD5"]
    conf = {"source_url": path.as_uri(), "source_md5": md5, "image_size": 67, "epochs": 2,
            "validation_size": 50, "batch_size": 16, "recipe": "reference",
            "publish_mode": "always"}  # published whatever two epochs on tiny data score
    conf.update(json.loads(os.environ.get("ALEXNET_UI_CONF") or "{}"))
    run = subprocess.run([airflow_bin(), "dags", "test", "alexnet_cifar10", "-c", json.dumps(conf)],
                         env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    [line] = [json.loads(text) for text in (artifacts / "published" / "index.jsonl").read_text().splitlines()]
    # `dags test` serialized only the main DAG: the promote page triggers alexnet_cifar10_promote through the API.
    subprocess.run([airflow_bin(), "dags", "reserialize"], env=env, check=True, capture_output=True)

    log = (folder / "api-server.log").open("w")
    process = subprocess.Popen([airflow_bin(), "api-server", "--port", str(port)], env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}/airflow/"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if request(base + "api/v2/monitor/health")[0] == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None, (folder / "api-server.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the api-server never became healthy"
            time.sleep(1)
        yield base, line, folder
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def token(server) -> str:
    base, _, _ = server
    status, body = request(base + "auth/token", data={"username": "admin", "password": PASSWORD})
    assert status in (200, 201), body
    return json.loads(body)["access_token"]


@pytest.mark.slow
def test_api_server_loads_the_plugin_without_errors(server, token):
    base, line, _ = server
    status, body = request(base + "api/v2/plugins/importErrors", token)
    assert status == 200 and json.loads(body) == {"import_errors": [], "total_entries": 0}
    status, body = request(base + "api/v2/plugins", token)
    plugins = {plugin["name"]: plugin for plugin in json.loads(body)["plugins"]}
    assert {view["url_route"] for view in plugins["alexnet_results"]["external_views"]} == {"alexnet-runs", "alexnet-results"}
    # Unauthenticated callers get nothing from the plugin's app.
    assert request(base + "alexnet/runs")[0] == 401
    assert request(base + f"alexnet/runs/{quote(line['run_id'], safe='')}/files/confusion_matrix.png")[0] == 401
    # The task instances' extra link leads to the DAG run's Results tab.
    run = quote(line["run_id"], safe="")
    status, body = request(base + f"api/v2/dags/alexnet_cifar10/dagRuns/{run}/taskInstances/train/links", token)
    assert status == 200, body
    assert json.loads(body)["extra_links"]["AlexNet results"] == f"dags/alexnet_cifar10/runs/{run}/plugin/alexnet-results"


@pytest.fixture(scope="module")
def browser():
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download a driver or browser
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1440,1000", "--hide-scrollbars"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition, timeout: float = 60, message: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception:  # the element is not there yet
            pass
        assert time.monotonic() < deadline, f"timed out: {message}"
        time.sleep(0.3)


def screenshot(driver, folder: Path, name: str, frame_height: bool = False) -> None:
    """Save a screenshot; with ``frame_height`` the window grows to show the whole plugin page."""
    if frame_height:
        height = driver.execute_script(
            "return document.querySelector('iframe').contentDocument.documentElement.scrollHeight")
        driver.set_window_size(1440, min(height + 80, 3200))
        time.sleep(0.5)
    driver.save_screenshot(str(folder / name))
    target = os.environ.get("ALEXNET_UI_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / name, Path(target) / name)
    if frame_height:
        driver.set_window_size(1440, 1000)


def enter_plugin_frame(driver) -> None:
    driver.switch_to.default_content()
    frame = wait_for(lambda: driver.find_element("css selector", "iframe"), message="the plugin's iframe")
    driver.switch_to.frame(frame)


def images_and_curves(driver) -> dict:
    return driver.execute_script(
        "const image = document.getElementById('confusion-matrix');"
        "return {loaded: !!image && image.complete && image.naturalWidth > 0, width: image ? image.naturalWidth : 0,"
        " curves: Array.from(document.querySelectorAll('svg.curves polyline.series'))"
        "   .filter(line => line.getAttribute('points').trim().split(' ').length >= 2"
        "     && line.getBoundingClientRect().width > 0).length};"
    )


def follow_to_airflow_page(driver, url: str, text: str, what: str) -> None:
    """After a click on a link to one of Airflow's pages in the plugin's frame: the whole window shows ``url``.

    Waits until the top window's URL is ``url``, the plugin's frame is gone and Airflow's page shows ``text``.
    """
    driver.switch_to.default_content()
    wait_for(lambda: driver.current_url == url, timeout=30,
             message=f"{what}: the window's URL stays {driver.current_url}, expected {url}")
    wait_for(lambda: not driver.find_elements("css selector", "iframe")
             and text in driver.find_element("tag name", "body").text,
             message=f"{what}: Airflow's page for {url} showing {text!r}")


@pytest.mark.slow
def test_results_in_the_airflow_ui_in_a_real_browser(server, browser, token):
    base, line, folder = server
    try:
        browse_the_results(browser, base, line, folder, token)
    except Exception:
        browser.switch_to.default_content()
        browser.save_screenshot(str(folder / "failure.png"))
        (folder / "failure.html").write_text(browser.page_source)
        raise


def browse_the_results(browser, base: str, line: dict, folder: Path, token: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    run_id, accuracy = line["run_id"], f"{line['test_accuracy']:.2%}"
    started = time.monotonic()

    # Log in through the simple auth manager's form.
    browser.get(base)
    wait_for(lambda: browser.find_element(By.NAME, "username"), message="the login form")
    browser.find_element(By.NAME, "username").send_keys("admin")
    browser.find_element(By.NAME, "password").send_keys(PASSWORD + Keys.ENTER)
    wait_for(lambda: browser.get_cookie("_token"), message="the login cookie")

    # Browse -> AlexNet runs.
    browse = wait_for(lambda: browser.find_element(By.XPATH, "//button[normalize-space()='Browse']"),
                      message="the Browse menu")
    browse.click()
    wait_for(lambda: browser.find_element(By.XPATH, "//*[@role='menuitem'][normalize-space()='AlexNet runs']"),
             message="the AlexNet runs entry").click()
    wait_for(lambda: "/plugin/alexnet-runs" in browser.current_url, message="the plugin page")
    enter_plugin_frame(browser)
    row = wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "tr.run"), message="the runs table")
    assert run_id in row.text and accuracy in row.text and "champion" in row.text
    assert browser.execute_script("return document.querySelectorAll('#accuracy-chart polyline').length") == 1
    browser.switch_to.default_content()
    screenshot(browser, folder, "ui-runs.png")

    # The run's page, from the list.
    enter_plugin_frame(browser)
    browser.find_element(By.CSS_SELECTOR, "a.run-page").click()
    state = wait_for(lambda: (lambda s: s if s["loaded"] and s["curves"] == 4 else None)(images_and_curves(browser)),
                     message="the run page's confusion matrix and curves")
    assert state["width"] > 0
    assert accuracy in browser.find_element(By.ID, "test-accuracy").text
    assert browser.find_element(By.ID, "verdict").text.startswith("Blessed")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#checks tr.check")) == 5, "the gate's five checks"
    assert browser.find_element(By.CSS_SELECTOR, "#config").text.count("batch_size") == 1
    browser.switch_to.default_content()
    screenshot(browser, folder, "ui-run.png", frame_height=True)

    # The compare page, picked in the list's plain form (the one run against itself: its A is checked already).
    enter_plugin_frame(browser)
    browser.find_element(By.CSS_SELECTOR, "nav.crumbs a").click()  # All AlexNet runs
    wait_for(lambda: browser.find_element(By.ID, "compare-button"), message="the list's compare form")
    browser.find_element(By.CSS_SELECTOR, "input[name='b']").click()
    browser.find_element(By.ID, "compare-button").click()
    loaded = wait_for(lambda: browser.execute_script(
        "const images = Array.from(document.querySelectorAll('#confusion-matrices img'));"
        "const curves = document.querySelectorAll('svg.curves polyline.series').length;"
        "return images.length == 2 && images.every(image => image.complete && image.naturalWidth > 0)"
        "  && curves == 8 ? curves : 0;"), message="the compare page's two confusion matrices and curves")
    assert loaded == 8
    assert browser.find_element(By.ID, "run-a").text == browser.find_element(By.ID, "run-b").text == run_id
    assert browser.find_element(By.ID, "only-a").text == browser.find_element(By.ID, "only-b").text == "0"
    assert browser.find_element(By.ID, "mcnemar-p").text == "1.0000"
    browser.switch_to.default_content()
    screenshot(browser, folder, "ui-compare.png", frame_height=True)

    # The champion history, from the list: the publish through the gate appended one change of champion.
    enter_plugin_frame(browser)
    browser.find_element(By.CSS_SELECTOR, "nav.crumbs a").click()  # All AlexNet runs
    wait_for(lambda: browser.find_element(By.ID, "history-link"), message="the list's history link").click()
    changes = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#history tr.change"),
                       message="the history's rows")
    assert [change.get_attribute("data-run-id") for change in changes] == [run_id]
    assert changes[0].get_attribute("data-reason") == "gate"
    assert "blessed by the gate" in changes[0].find_element(By.CSS_SELECTOR, "td.reason").text
    assert changes[0].find_element(By.CSS_SELECTOR, "a.run-page").text == run_id
    assert changes[0].find_element(By.CSS_SELECTOR, "td.user").text == "—"
    airflow_run = changes[0].find_element(By.XPATH, ".//a[@target='_top']")
    assert airflow_run.text == "alexnet_cifar10"
    assert airflow_run.get_attribute("href") == base + f"dags/alexnet_cifar10/runs/{quote(run_id, safe='')}"
    browser.switch_to.default_content()
    screenshot(browser, folder, "ui-history.png")

    # Its link to the Airflow run opens the DAG run's page in the whole window (the frame's sandbox has no
    # allow-top-navigation: target="_top" alone does nothing), and Back returns to the history in the frame.
    history_url = browser.current_url
    enter_plugin_frame(browser)
    browser.find_element(By.CSS_SELECTOR, "#history tr.change a[target='_top']").click()
    follow_to_airflow_page(browser, base + f"dags/alexnet_cifar10/runs/{quote(run_id, safe='')}", run_id,
                           "the history's Airflow-run link")
    wait_for(lambda: browser.find_element(By.XPATH, "//a[normalize-space()='Results']"),
             message="the DAG run page's Results tab")
    browser.back()
    wait_for(lambda: browser.current_url == history_url, message="Back to the champion history")
    enter_plugin_frame(browser)
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#history tr.change"), message="the history again")

    # The promote page in the plugin's frame (the one run is the champion, so no run page links to it: open it
    # directly): a reason typed in, the button posts to Airflow's REST API with the login cookie.
    enter_plugin_frame(browser)
    browser.execute_script("window.location.href = arguments[0];", "promote?run=" + quote(run_id, safe=""))
    wait_for(lambda: browser.find_element(By.ID, "promote-reason"), message="the promote form")
    assert browser.find_element(By.ID, "promote-run-id").get_attribute("value") == run_id
    assert accuracy in browser.find_element(By.ID, "promote-accuracy").text
    reason = "browser test: promote the champion again"
    browser.find_element(By.ID, "promote-reason").send_keys(reason)
    browser.find_element(By.ID, "promote-button").click()
    outcome = wait_for(lambda: (lambda text: text if text and not text.startswith("Triggering") else None)(
        browser.find_element(By.ID, "promote-result").text), message="the trigger's outcome")
    assert outcome.startswith("Triggered: DAG run "), outcome
    created = browser.find_element(By.ID, "promote-run-link")
    dag_run_id = created.text
    assert created.get_attribute("href") == base + f"dags/alexnet_cifar10_promote/runs/{quote(dag_run_id, safe='')}"
    assert created.get_attribute("target") == "_top"
    status, body = request(base + "api/v2/dags/alexnet_cifar10_promote/dagRuns", token)
    assert status == 200, body
    runs = {run["dag_run_id"]: run for run in json.loads(body)["dag_runs"]}
    assert runs[dag_run_id]["conf"] == {"run_id": run_id, "reason": reason}
    assert runs[dag_run_id]["run_type"] == "manual"
    browser.switch_to.default_content()
    screenshot(browser, folder, "ui-promote.png")
    enter_plugin_frame(browser)
    browser.find_element(By.ID, "promote-run-link").click()  # the DAG run it triggered, in the whole window
    follow_to_airflow_page(browser, base + f"dags/alexnet_cifar10_promote/runs/{quote(dag_run_id, safe='')}",
                           dag_run_id, "the promote page's link to the DAG run")

    # The DAG run's Results tab.
    browser.get(base + f"dags/alexnet_cifar10/runs/{quote(run_id, safe='')}")
    wait_for(lambda: browser.find_element(By.XPATH, "//a[normalize-space()='Results']"),
             message="the Results tab").click()
    wait_for(lambda: "/plugin/alexnet-results" in browser.current_url, message="the Results tab's page")
    enter_plugin_frame(browser)
    state = wait_for(lambda: (lambda s: s if s["loaded"] and s["curves"] == 4 else None)(images_and_curves(browser)),
                     message="the tab's confusion matrix and curves")
    assert run_id in browser.find_element(By.ID, "run-id").text
    browser.switch_to.default_content()
    screenshot(browser, folder, "ui-results-tab.png")

    # The tab's "Airflow run" breadcrumb (relative to the tab's own URL) leads to the DAG run's page in the window.
    enter_plugin_frame(browser)
    browser.find_element(By.XPATH, "//nav[@class='crumbs']/a[normalize-space()='Airflow run']").click()
    follow_to_airflow_page(browser, base + f"dags/alexnet_cifar10/runs/{quote(run_id, safe='')}", run_id,
                           "the Results tab's Airflow run link")

    # Opened on its own (no frame), the plugin's link to Airflow is a plain link the browser follows.
    browser.get(base + "alexnet/history")
    wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "#history tr.change a[target='_top']"),
             message="the history outside Airflow's frame").click()
    wait_for(lambda: browser.current_url == base + f"dags/alexnet_cifar10/runs/{quote(run_id, safe='')}",
             message="the history's Airflow-run link outside the frame")
    wait_for(lambda: run_id in browser.find_element(By.TAG_NAME, "body").text, message="the DAG run's page")
    print(f"browser steps took {time.monotonic() - started:.1f} s")
