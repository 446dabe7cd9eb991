"""The web page in a real browser: Debian's chromium, headless, driven by selenium through
chromium-driver, against the real server with real trained models, and no network but
loopback (every other host name resolves to nothing, no proxy).

A 7 is drawn with a mouse and a 3 with a finger, stroke by stroke; what the page shows is
checked against the server's own answer for the exact 28x28 pixels the page sent, and
its canvases pixel by pixel against serving/explain_render.py's colour scale."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from helpers import REPO_ROOT, TRAINING_SEED, http_call, png, train_quickly
from leakcheck import survivors
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions import interaction
from selenium.webdriver.common.actions.action_builder import ActionBuilder
from selenium.webdriver.common.actions.pointer_input import PointerInput
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from serving.explain_render import vote_colours, vote_limit
from serving.imaging import png_to_image
from serving.launcher import ServerProcess, start_server
from training.publish import TrainingRecord, publish_model
from training.train import evaluate, is_seven, to_pixels

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT = 30.0  # seconds for anything the page does; every wait is bounded by it
PAD = 280  # the drawing pad's own pixels (serving/web/app.js)
SIDE = 28
SCALE = 10  # panel pixels per image pixel (serving/web/app.js)
TOKEN = "page-token-1"
CREATED_AT = "2026-12-01T00:00:00+00:00"
JSON_TYPE = {"Content-Type": "application/json"}
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # as root (CI containers), chromium refuses to start with its sandbox
    "--disable-dev-shm-usage",
    "--window-size=1280,1400",
    "--force-device-scale-factor=1",
    "--force-color-profile=srgb",  # canvas colours reach the screenshot unchanged
    # No network but loopback: every other name resolves to nothing, and no proxy.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--no-proxy-server",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
)

# The strokes, in pad pixels (0-280): a 7 (top bar, then the diagonal) and a 3 (two arcs).
SEVEN = [
    *[(50 + 18 * step, 55) for step in range(11)],
    *[(230 - 12 * step, 55 + 20 * step) for step in range(1, 11)],
]


def _arc(centre: tuple[float, float], radius: float, start: float, end: float, steps: int):
    return [
        (
            centre[0] + radius * math.cos(math.radians(start + (end - start) * step / steps)),
            centre[1] + radius * math.sin(math.radians(start + (end - start) * step / steps)),
        )
        for step in range(steps + 1)
    ]


THREE = [*_arc((140, 90), 55, -160, 90, 16), *_arc((140, 200), 55, -90, 160, 16)[1:]]


@pytest.fixture(scope="module")
def repository(tmp_path_factory, test_digits) -> Path:
    """`linear` and `mlp` v1, trained for a few epochs and published for real."""
    repository = tmp_path_factory.mktemp("page-repository")
    images, labels = test_digits
    for arch in ("linear", "mlp"):
        model = train_quickly(arch)
        accuracy = evaluate(model, to_pixels(images), is_seven(labels)).accuracy
        record = TrainingRecord(
            arch,
            30 if arch == "mlp" else None,
            TRAINING_SEED,
            CREATED_AT,
            {},
            {"accuracy": accuracy},
        )
        publish_model(model, record, images, repository, arch)
        if arch == "linear":
            torch.save(model.state_dict(), repository / "linear-weights.pt")
    return repository


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory) -> Iterator[ServerProcess]:
    running = start_server(repository, tmp_path_factory.mktemp("logs"))
    try:
        yield running
    finally:
        running.terminate()


def _browser_processes() -> dict[int, str]:
    return {pid: command for pid, command in survivors().items() if "chrom" in command}


@pytest.fixture
def browser(tmp_path) -> Iterator[WebDriver]:
    """Headless chromium through chromium-driver, quit at the end, and none of its
    processes left behind."""
    assert shutil.which("chromium") and shutil.which("chromedriver"), (
        "the browser test needs Debian's chromium and chromium-driver: bash scripts/setup-system.sh"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_page_load_timeout(WAIT)
        driver.set_script_timeout(WAIT)
        yield driver
    finally:
        driver.quit()
        deadline = time.monotonic() + WAIT
        while _browser_processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _browser_processes(), "chromium outlived driver.quit()"


def wait_for(driver: WebDriver, condition, what: str):
    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.05).until(condition)
    except TimeoutException:
        pytest.fail(f"the page did not {what} within {WAIT:g} s; status: {status_text(driver)!r}")


def status_text(driver: WebDriver) -> str:
    return driver.find_element(By.ID, "status").text


def open_page(driver: WebDriver, server: ServerProcess) -> None:
    driver.get(server.http_url + "/")
    wait_for(
        driver,
        lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"),
        "list the model versions",
    )


def draw(driver: WebDriver, pad: WebElement, points, kind: str) -> None:
    """One stroke through `points` (pad pixels) with a mouse or a finger: down at the
    first, a move to each of the others, up at the last."""
    scale = driver.execute_script("return arguments[0].clientWidth", pad) / PAD
    pointer = PointerInput(
        interaction.POINTER_MOUSE if kind == "mouse" else interaction.POINTER_TOUCH, kind
    )
    actions = ActionBuilder(driver, mouse=pointer, duration=15)

    def offset(point: tuple[float, float]) -> tuple[int, int]:
        # W3C actions place a pointer relative to the element's centre.
        return round((point[0] - PAD / 2) * scale), round((point[1] - PAD / 2) * scale)

    actions.pointer_action.move_to(pad, *offset(points[0]))
    actions.pointer_action.pointer_down()
    for point in points[1:]:
        actions.pointer_action.move_to(pad, *offset(point))
    actions.pointer_action.pointer_up()
    actions.perform()


SETTLED = """
const result = document.getElementById("result");
const seen = document.getElementById("seen");
if (result.dataset.state !== "idle" || !result.dataset.pixels) return null;
if (result.dataset.pixels !== seen.dataset.pixels) return null;
if (arguments[0] && result.dataset.model !== arguments[0]) return null;
return {
  pixels: result.dataset.pixels.split(",").map(Number),
  model: result.dataset.model,
  digit: document.getElementById("digit").textContent,
  p7: document.getElementById("p7").textContent,
};
"""


def shown_answer(driver: WebDriver, model: str | None = None) -> dict:
    """The answer the page shows once it is idle, with the pixels it sent for it."""
    return wait_for(
        driver, lambda d: d.execute_script(SETTLED, model), f"show an answer from {model}"
    )


CELLS = """
const context = document.getElementById(arguments[0]).getContext("2d");
const data = context.getImageData(0, 0, 280, 280).data;
const cells = [];
for (let y = 0; y < 28; y++) for (let x = 0; x < 28; x++) {
  const at = ((y * 10 + 5) * 280 + x * 10 + 5) * 4;
  cells.push([data[at], data[at + 1], data[at + 2]]);
}
return cells;
"""


def canvas_cells(driver: WebDriver, canvas_id: str) -> np.ndarray:
    """The colour at the centre of each of a panel's 28x28 cells, [784, 3]."""
    return np.array(driver.execute_script(CELLS, canvas_id), dtype=np.int64)


def explain(server: ServerProcess, pixels: list[int], model: str, **headers: str) -> dict:
    name, version = model.split("/")
    body = json.dumps(
        {"images": [{"pixels": pixels}], "model_name": name, "model_version": version}
    )
    status, _, answer = http_call(
        server.http_address, "POST", "/v1/explain", body.encode(), {**JSON_TYPE, **headers}
    )
    assert status == 200, answer
    return json.loads(answer)["explanations"][0]


def check_against_the_server(driver, server, shown: dict, **headers: str) -> dict:
    """The page's digit and P(7), and its three image panels, are the server's answer for
    the pixels the page sent."""
    served = explain(server, shown["pixels"], shown["model"], **headers)
    assert served["pixels"] == shown["pixels"]
    assert shown["digit"] == str(served["digit"])
    decimals = len(shown["p7"].split(".")[1])
    assert decimals == 4, shown["p7"]
    assert abs(float(shown["p7"]) - served["probability_seven"]) <= 0.5 * 10**-decimals + 1e-9
    # What the model sees: exactly the pixels sent, dark ink on white.
    seen = canvas_cells(driver, "seen")
    np.testing.assert_array_equal(seen, np.repeat(255 - np.array(shown["pixels"])[:, None], 3, 1))
    # The votes, on explain_render's colour scale (up to rounding).
    votes = np.array(served["contributions"], np.float32)
    expected = vote_colours(votes, vote_limit(votes)).astype(np.int64)
    assert np.abs(canvas_cells(driver, "votes") - expected).max() <= 1
    return served


def image_pixels(shown: dict) -> np.ndarray:
    return np.array(shown["pixels"], np.uint8).reshape(SIDE, SIDE)


def check_mnist_shape(pixels: np.ndarray) -> None:
    """The drawing became an MNIST-style image: its ink's longest side is the 20-pixel
    box, and its centre of mass is within half a pixel of (14, 14)."""
    rows = np.flatnonzero((pixels > 0).any(axis=1))
    columns = np.flatnonzero((pixels > 0).any(axis=0))
    assert max(rows[-1] - rows[0], columns[-1] - columns[0]) + 1 in (20, 21)
    ys, xs = np.indices(pixels.shape)
    weight = pixels.astype(np.float64)
    centre = ((ys * weight).sum() / weight.sum(), (xs * weight).sum() / weight.sum())
    assert abs(centre[0] - 14) <= 0.5 and abs(centre[1] - 14) <= 0.5, centre


def vote_map_region(driver: WebDriver, screenshot: Path) -> np.ndarray:
    """The vote map's pixels in a screenshot of the whole window."""
    driver.save_screenshot(str(screenshot))
    rect = driver.execute_script(
        "const r = document.getElementById('votes').getBoundingClientRect();"
        "return [r.left, r.top, r.width, r.height, window.devicePixelRatio];"
    )
    left, top, width, height, ratio = rect
    picture = np.asarray(Image.open(screenshot).convert("RGB"), np.int64)
    box = [
        round(value * ratio) for value in (top + 2, top + height - 2, left + 2, left + width - 2)
    ]
    return picture[box[0] : box[1], box[2] : box[3]]


def focus_order(driver: WebDriver, presses: int = 10) -> list[str]:
    """The ids the Tab key reaches, from the top of the page."""
    driver.execute_script("document.activeElement && document.activeElement.blur()")
    reached = []
    for _ in range(presses):
        ActionChains(driver).send_keys(Keys.TAB).perform()
        reached.append(driver.switch_to.active_element.get_attribute("id") or "")
    return reached


def page_errors(driver: WebDriver) -> list[str]:
    """The console's errors: scripts that failed, CSP refusals, loads that failed."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_draw_a_seven_and_a_three_and_see_why(browser, server, repository, tmp_path):
    driver = browser
    open_page(driver, server)
    models = [option.text for option in driver.find_elements(By.CSS_SELECTOR, "#model option")]
    assert models == ["linear version 1 (linear)", "mlp version 1 (mlp)"]

    # The linear model's weights: explaining all ink gives them exactly, in the colours of
    # weights.png; the page draws them with the same scale.
    wait_for(
        driver,
        lambda d: d.find_element(By.ID, "weights").is_displayed(),
        "show the linear model's weights",
    )
    weights = np.array(explain(server, [255] * 784, "linear/1")["contributions"], np.float32)
    trained = torch.load(repository / "linear-weights.pt")["weights"].numpy()
    np.testing.assert_allclose(weights, trained, rtol=0, atol=1e-6)
    expected = vote_colours(weights, vote_limit(weights)).astype(np.int64)
    assert np.abs(canvas_cells(driver, "weights") - expected).max() <= 1

    # From here on every /v1/explain is a drawing's (the weights were fetched): keep
    # every request's timing, to check that no two were in flight at once.
    driver.execute_script("performance.setResourceTimingBufferSize(5000)")
    drawings_from = driver.execute_script("return performance.now()")

    # A 7, drawn with the mouse, in one stroke of 20 moves.
    pad = driver.find_element(By.ID, "pad")
    draw(driver, pad, SEVEN, "mouse")
    seven = shown_answer(driver, "linear/1")
    check_against_the_server(driver, server, seven)
    check_mnist_shape(image_pixels(seven))
    assert seven["digit"] == "7"
    region = vote_map_region(driver, tmp_path / "seven.png")
    red = (region[..., 0] - region[..., 2] > 30).sum()
    blue = (region[..., 2] - region[..., 0] > 30).sum()
    # Drawn, both ways: a 7's ink votes 7 mostly, and 3 where 3s have ink (a cell on
    # screen is about 70 pixels).
    assert red > 1000 and blue > 100, (red, blue)
    assert region.std() > 10

    # Another version, picked with the keyboard: the same drawing, the MLP's answer.
    model = driver.find_element(By.ID, "model")
    model.send_keys(Keys.ARROW_DOWN)
    mlp_seven = shown_answer(driver, "mlp/1")
    assert mlp_seven["pixels"] == seven["pixels"]
    check_against_the_server(driver, server, mlp_seven)
    assert mlp_seven["digit"] == "7"
    assert not driver.find_element(By.ID, "weights").is_displayed()
    assert "MLP" in driver.find_element(By.ID, "weights-note").text

    # Clear (with the keyboard), then a 3 with a finger.
    driver.find_element(By.ID, "clear").send_keys(Keys.ENTER)
    assert driver.find_element(By.ID, "digit").text == "-"
    assert driver.execute_script("return document.getElementById('seen').dataset.pixels") == ""
    draw(driver, pad, THREE, "touch")
    three = shown_answer(driver, "mlp/1")
    check_against_the_server(driver, server, three)
    check_mnist_shape(image_pixels(three))
    assert three["digit"] == "3"
    region = vote_map_region(driver, tmp_path / "three.png")
    assert (region[..., 2] - region[..., 0] > 30).sum() > 1000  # a 3's ink votes 3

    # One request in flight at most: each drawing's request started after the one
    # before had its answer.
    requests = driver.execute_script(
        "return performance.getEntriesByType('resource').filter(e => "
        "e.name.endsWith('/v1/explain') && e.startTime >= arguments[0])"
        ".map(e => [e.startTime, e.responseEnd])",
        drawings_from,
    )
    assert len(requests) >= 3  # the 7 (twice: linear, then MLP) and the 3, at least
    requests.sort()
    for (_, previous_end), (start, _) in itertools.pairwise(requests):
        assert start >= previous_end - 0.01, requests
    print(f"{len(requests)} drawing requests for {len(SEVEN) + len(THREE)} pointer moves")

    # A PNG the server refuses: its message, and the page goes on.
    blank_png = tmp_path / "blank.png"
    blank_png.write_bytes(png(np.full((28, 28), 255, np.uint8)))
    driver.find_element(By.ID, "upload").send_keys(str(blank_png))
    wait_for(driver, lambda d: "no ink found" in status_text(d), "say why the PNG was refused")
    assert driver.find_element(By.ID, "digit").text == "-"

    # A PNG uploaded through the file input: the server converts it, the page shows that.
    example = REPO_ROOT / "examples" / "seven-1.png"
    driver.find_element(By.ID, "upload").send_keys(str(example))
    uploaded = wait_for(
        driver,
        lambda d: (
            (a := d.execute_script(SETTLED, "mlp/1")) and a["pixels"] != three["pixels"] and a
        ),
        "explain the uploaded PNG",
    )
    converted = png_to_image(example.read_bytes(), 0)
    assert uploaded["pixels"] == converted.reshape(-1).tolist()
    check_against_the_server(driver, server, uploaded)

    # Everything came from the server itself: the page, its files and every API call.
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(server.http_url))
    loaded = driver.execute_script(
        "return performance.getEntriesByType('navigation').concat("
        "performance.getEntriesByType('resource')).map(e => e.name)"
    )
    assert {"/", "/app.js", "/style.css", "/v1/explain"} <= {urlsplit(u).path for u in loaded}
    assert all(url.startswith(origin + "/") for url in loaded), loaded
    # No script error, no CSP refusal, no failed load but the blank PNG's 400.
    errors = page_errors(driver)
    assert len(errors) == 1 and "/v1/explain" in errors[0] and "400" in errors[0], errors


def test_every_control_is_labelled_and_reached_with_the_keyboard(browser, server):
    driver = browser
    open_page(driver, server)
    labelled = driver.execute_script(
        "return [...document.querySelectorAll('input, select, textarea')].map(e => "
        "[e.id, [...e.labels].map(l => l.textContent.trim())])"
    )
    assert dict(labelled) == {
        "model": ["Model version"],
        "token": ["Bearer token"],
        "upload": ["Or upload a PNG"],
    }
    for button in driver.find_elements(By.TAG_NAME, "button"):
        assert button.text.strip(), "a button without a name"
    reached = focus_order(driver)
    for control in ("model", "token", "clear", "upload"):
        assert control in reached, reached
    live = driver.find_element(By.ID, "result")
    assert live.get_attribute("aria-live") == "polite"
    assert driver.find_element(By.ID, "status").get_attribute("role") == "status"
    assert page_errors(driver) == []


def test_with_a_token_file_the_page_asks_for_the_token_and_sends_it(browser, repository, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    metadata = [("authorization", f"Bearer {TOKEN}")]
    server = start_server(repository, tmp_path, "--auth-token-file", str(tokens), metadata=metadata)
    try:
        driver = browser
        driver.get(server.http_url + "/")  # the page itself needs no token
        wait_for(driver, lambda d: "bearer token" in status_text(d), "ask for the token")
        assert not driver.find_elements(By.CSS_SELECTOR, "#model option")
        token = driver.find_element(By.ID, "token")
        token.send_keys(TOKEN, Keys.TAB)  # a change event: the page lists the models
        wait_for(
            driver,
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) == 2,
            "list the models with the token",
        )
        stored = driver.execute_script("return sessionStorage.getItem('mnist37.token')")
        assert stored == TOKEN
        draw(driver, driver.find_element(By.ID, "pad"), SEVEN, "mouse")
        shown = shown_answer(driver, "linear/1")
        check_against_the_server(driver, server, shown, Authorization=f"Bearer {TOKEN}")
        # The 401s the page met before the token are the only errors it logged.
        assert all("401" in message for message in page_errors(driver))
    finally:
        with contextlib.suppress(Exception):
            browser.get("about:blank")
        assert server.terminate() == 0, server.log()
