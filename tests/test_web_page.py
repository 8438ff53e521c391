"""The browser page (web/) end to end: a real `bioadapt serve` serves it and the bioadapt service; Debian's
chromium, driven by Playwright, connects with a user's token, opens the most uncertain patch, paints a stroke with
the mouse and submits; the label store then holds the stroke where it was painted. Then it fine-tunes (live loss)
and exports, and the download link gives the package's zip; last it scores new patches with a strategy chosen in
the form.

Skipped when the Python `playwright` package or a chromium binary is missing (failed under CI=true). Set BIOADAPT_WEB_SCREENSHOT to a
path to keep a screenshot of the page (docs/web-page.png was made that way).
"""

from __future__ import annotations

import os
import re
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import needs
from model_factory import unet_package
from service_helpers import ServiceProcess, client_for

from bioadapt.adapters.base import DEFAULT_MC_PASSES
from bioadapt.data.synthetic import write_synthetic_ome_zarr
from bioadapt.service import schemas as s
from bioadapt.service.hypha_server import mint_token
from bioadapt.service.web import WEB_DIR, static_response

USER, WORKSPACE = "svc-web", "ws-user-svc-web"
PATCH = [64, 64]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STROKE_ROW, STROKE_FROM, STROKE_TO, BRUSH = 20, 8, 55, 3  # patch pixels; brush diameter


def chromium_path() -> str | None:
    for candidate in (os.environ.get("BIOADAPT_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


try:
    from playwright.sync_api import sync_playwright
except ModuleNotFoundError:
    sync_playwright = None
CHROMIUM = chromium_path()
# a mark, not a skip inside a fixture: without a browser not even the session's Ray and Hypha get started
needs_browser = needs("Chromium and playwright", absent=sync_playwright is None or CHROMIUM is None,
                      reason="no Python playwright package (pip install playwright)" if sync_playwright is None
                      else "no chromium binary (apt-get install chromium)")


# -- the static files, without a browser -------------------------------------------------------------------------
def test_static_files_come_only_from_the_web_folder(tmp_path):
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "index.html").write_text("<p>page</p>")
    (tmp_path / "web" / "app.mjs").write_text("export {};")
    (tmp_path / "secret.txt").write_text("no")
    web = tmp_path / "web"
    assert static_response(web, "/")["body"] == b"<p>page</p>"
    module = static_response(web, "/app.mjs")
    assert module["status"] == 200 and module["headers"]["content-type"].startswith("text/javascript")
    for outside in ("/../secret.txt", "/%2e%2e/secret.txt", "/..%2Fsecret.txt", str(tmp_path / "secret.txt")):
        assert static_response(web, outside)["status"] == 404, outside
    assert static_response(web, "/missing.js")["status"] == 404
    assert (WEB_DIR / "index.html").is_file() and (WEB_DIR / "vendor" / "hypha-rpc" / "LICENSE").is_file()


def test_the_score_form_offers_every_strategy_and_acquisition_of_the_service():
    from bioadapt.active import ACQUISITIONS, STRATEGIES

    page = (WEB_DIR / "index.html").read_text()

    def options(select_id: str) -> list[str]:
        select = re.search(rf'<select id="{select_id}".*?</select>', page, re.S).group(0)
        # an option's value attribute, else its text
        return [attribute[len(' value="'):-1] if attribute else text
                for attribute, text in re.findall(r'<option( value="[^"]*")?>([^<]*)<', select)]

    # the first option, "" (left out of the call), lets the service choose: its default strategy, the strategy's map
    assert options("strategy")[0] == "" and sorted(options("strategy")[1:]) == sorted(STRATEGIES)
    assert options("acquisition")[0] == "" and sorted(options("acquisition")[1:]) == sorted(ACQUISITIONS)


# -- the page in a browser ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh user-data-dir
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 900})
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def service(hypha_server, ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("web-service")
    allowed = root / "inputs"
    allowed.mkdir()
    write_synthetic_ome_zarr(allowed / "image.ome.zarr", (512, 512), "crowded", seed=0)
    unet_package(allowed / "model.zip", features=4, weights=("pytorch_state_dict",))
    process = ServiceProcess(hypha_server, ray_cluster, USER, root / "data", [allowed])
    process.start()
    process.inputs = allowed
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def webuser(hypha_server, service):
    client = client_for(hypha_server, "webuser", WORKSPACE)
    yield client
    client.disconnect()


@pytest.fixture(scope="module")
def project(webuser, service):
    """webuser's project with 6 scored 64 x 64 patches (no hold-out, so every annotated patch trains)."""
    created = webuser.create_project("web", str(service.inputs / "model.zip"),
                                     [{"uri": str(service.inputs / "image.ome.zarr")}], holdout_fraction=0)
    started = webuser.score(created["id"], n_patches=6, patch_shape=PATCH, mc_passes=2, seed=0)
    assert webuser.wait(started["job_id"], progress=False, timeout_s=120)["state"] == "done"
    return created


@needs_browser  # no browser needed, but it shares the browser test's service (~30 s to start)
def test_page_is_served_with_the_service(service):
    url = service.info["web_url"]
    assert url.startswith(f"{service.info['server_url']}/{WORKSPACE}/apps/bioadapt-web/?server_url=")
    assert "token" not in url
    with urllib.request.urlopen(url.split("?")[0] + "vendor/hypha-rpc/hypha-rpc-websocket.min.mjs") as response:
        assert response.headers["content-type"].startswith("text/javascript")


@needs_browser
def test_label_tune_and_export_in_the_browser(browser_context, hypha_server, service, webuser, project, tmp_path):
    top = webuser.list_patches(project["id"], limit=1)[0]
    predicted = webuser.get_patch(project["id"], top["id"])["predicted_labels"]
    token = mint_token("webuser", workspaces={WORKSPACE: "r"}, jwt_secret=hypha_server.jwt_secret)

    page = browser_context.new_page()
    crashes: list[str] = []
    sent: list[bytes] = []  # every websocket message the page sends (msgpack: argument names are plain bytes)
    page.on("websocket", lambda socket: socket.on("framesent", lambda payload: sent.append(
        payload if isinstance(payload, bytes) else payload.encode())))
    page.on("pageerror", lambda error: crashes.append(str(error)))
    page.on("console", lambda message: print(f"browser {message.type}: {message.text}"))  # shown on failure
    page.goto(service.info["web_url"])
    assert page.input_value("#workspace") == WORKSPACE  # filled from the URL
    page.fill("#token", token)
    page.click("#connect")
    page.locator(f"#projects li[data-project-id='{project['id']}']").click(timeout=20_000)
    # the score form starts from the service's defaults, read from the schema it publishes
    shown = {field: page.input_value(f"#{field}") for field in ("n-patches", "patch-size", "mc-passes")}
    assert shown == {"n-patches": str(s.DEFAULT_RANDOM_PATCHES), "patch-size": str(s.DEFAULT_PATCH_SHAPE[0]),
                     "mc-passes": str(DEFAULT_MC_PASSES)}
    # the project by its model's name (the model was loaded from a path on the service's machine)
    page.wait_for_function("document.getElementById('project-info').textContent.includes(' · model ')")
    info = page.text_content("#project-info")
    assert f"model {project['model']['name']} · " in info and str(service.inputs) not in info, info
    # the uncertainty overview of the image: one canvas pixel per pixel of its coarse level (512 px: level 0)
    page.wait_for_function("document.getElementById('overview-status').textContent.includes('% scored')",
                           timeout=20_000)
    assert page.eval_on_selector("#overview-canvas", "c => [c.width, c.height]") == [512, 512]
    scored = 100 * 6 * PATCH[0] * PATCH[1] / 512**2
    assert page.text_content("#overview-status").startswith(f"{scored:.1f}% scored"), page.text_content(
        "#overview-status")
    page.locator(f"#patches li[data-patch-id='{top['id']}']").click(timeout=20_000)  # listed first: the top one
    assert page.locator("#patches li").first.get_attribute("data-patch-id") == str(top["id"])
    page.wait_for_function(f"document.getElementById('patch-info').textContent.includes('patch #{top['id']} ')")

    page.click("#new-label")
    new_id = int(page.input_value("#label-id"))
    assert new_id == int(predicted.max()) + 1
    page.eval_on_selector("#brush-size", f"e => {{ e.value = {BRUSH}; e.dispatchEvent(new Event('input')); }}")
    box = page.locator("#patch-canvas").bounding_box()

    def screen(x: float, y: float) -> tuple[float, float]:
        return box["x"] + (x + 0.5) / PATCH[1] * box["width"], box["y"] + (y + 0.5) / PATCH[0] * box["height"]

    page.mouse.move(*screen(STROKE_FROM, STROKE_ROW))
    page.mouse.down()
    page.mouse.move(*screen(STROKE_TO, STROKE_ROW), steps=12)
    page.mouse.up()
    page.click("#submit")
    page.wait_for_function("document.getElementById('message').textContent.includes('saved')", timeout=20_000)
    assert not crashes, crashes

    labels = webuser.get_patch(project["id"], top["id"])["labels"]
    assert labels.shape == tuple(PATCH)
    stroke = labels == new_id
    assert stroke[STROKE_ROW, STROKE_FROM:STROKE_TO + 1].all(), "the painted line is not all the new label"
    rows, cols = np.nonzero(stroke)
    assert rows.min() >= STROKE_ROW - BRUSH and rows.max() <= STROKE_ROW + BRUSH, "paint landed off the stroke"
    assert cols.min() >= STROKE_FROM - BRUSH and cols.max() <= STROKE_TO + BRUSH, "paint landed off the stroke"
    np.testing.assert_array_equal(labels[~stroke], predicted[~stroke])  # everything else: the model's labels
    assert page.locator(f"#patches li[data-patch-id='{top['id']}'] .status-annotated").count() == 1


    # fine-tune on that patch with the loss shown live, then export and download the package
    page.fill("#epochs", "2")
    page.click("#fine-tune")
    page.wait_for_function("document.getElementById('tune-status').textContent.startsWith('done: model version 1')",
                           timeout=180_000)
    assert "epoch 2 / 2, loss" in page.text_content("#tune-status")
    # one annotated patch cannot judge version 1: it is exported when named
    assert "used only when named" in page.text_content("#tune-status")
    page.fill("#export-version", "1")
    page.click("#export")
    page.locator("#download").wait_for(state="visible", timeout=180_000)
    assert page.get_attribute("#download", "download") == "web-v1.zip"  # the project's name and the version
    assert page.text_content("#download").startswith("Download web-v1.zip (")
    assert page.text_content("#export-status") == "model version 1 exported as a bioimage.io package (tested):"
    # nothing the page shows names a folder of the service's machine
    shown = page.evaluate("document.body.innerText")
    assert str(service.data_dir.resolve()) not in shown and str(service.inputs) not in shown, shown
    head = page.evaluate("async () => Array.from(new Uint8Array(await (await fetch("
                         "document.getElementById('download').href)).arrayBuffer()).slice(0, 2))")
    assert bytes(head) == b"PK", "the download is not a zip"
    assert [v["number"] for v in webuser.get_project(project["id"])["versions"]] == [0, 1]
    assert not crashes, crashes

    # score two new patches with a strategy chosen in the form (typical_bald reads the model's features); the
    # project's default is still version 0: version 1 is undecided
    page.select_option("#strategy", "typical_bald")
    page.fill("#n-patches", "2")
    page.fill("#patch-size", str(PATCH[0]))  # MC passes left as shown: not sent, the service's default applies
    page.click("#score")
    page.wait_for_function("document.getElementById('score-status').textContent.includes('patches scored')",
                           timeout=180_000)  # the job's progress reads "done: 2 / 2 patches" just before
    assert page.text_content("#score-status") == "done: 2 patches scored (typical_bald, model version 0)"
    calls = [frame for frame in sent if b"typical_bald" in frame and b"n_patches" in frame]
    assert len(calls) == 1 and b"patch_shape" in calls[0], "the score call was not seen as sent"
    assert b"mc_passes" not in calls[0] and b"\xa4mode" not in calls[0], "the page sent values nobody changed"
    assert not crashes, crashes

    page.check("#show-uncertainty")
    screenshot = os.environ.get("BIOADAPT_WEB_SCREENSHOT")
    page.screenshot(path=screenshot or str(tmp_path / "web-page.png"))
    page.close()


@needs_browser
def test_the_learning_curve_shows_each_version_against_its_parent(browser_context, hypha_server, service, webuser):
    """A project with held-out patches, fine-tuned through the Python client: the page draws the fine-tune as a
    point of the learning curve whose title says its verdict and why."""
    created = webuser.create_project("web curve", str(service.inputs / "model.zip"),
                                     [{"uri": str(service.inputs / "image.ome.zarr")}], holdout_fraction=0.5)
    started = webuser.score(created["id"], n_patches=4, patch_shape=PATCH, mc_passes=2, seed=1)
    assert webuser.wait(started["job_id"], progress=False, timeout_s=120)["state"] == "done"
    truth = zarr.open_group(str(service.inputs / "image.ome.zarr"), mode="r")["labels/ground_truth/0"]
    for patch in webuser.list_patches(created["id"], limit=4):
        (y, x), (h, w) = patch["origin"], patch["shape"]
        webuser.submit_labels(created["id"], patch["id"], np.asarray(truth[y:y + h, x:x + w], np.uint32))
    tuned = webuser.wait(webuser.fine_tune(created["id"], epochs=1)["job_id"], progress=False, timeout_s=180)
    verdict = tuned["result"]["verdict"]
    # 2 held-out patches are too few alone: one more fine-tune (on them) segments the 2 training patches
    assert tuned["state"] == "done" and (verdict["patches"], verdict["judged_by"]) == (4, "cross-validation")

    page = browser_context.new_page()
    page.goto(service.info["web_url"])
    page.fill("#token", mint_token("webuser", workspaces={WORKSPACE: "r"}, jwt_secret=hypha_server.jwt_secret))
    page.click("#connect")
    page.locator(f"#projects li[data-project-id='{created['id']}']").click(timeout=20_000)
    point = page.locator("#learning-curve circle.point")
    point.wait_for(timeout=20_000)
    assert point.count() == 1
    assert (point.get_attribute("data-version"), point.get_attribute("data-verdict")) == ("1", verdict["verdict"])
    assert page.text_content("#learning-curve circle.point title") == f"v1 ({verdict['verdict']}): {verdict['reason']}"
    assert "model version" in page.text_content("#project-info")
    page.close()
