"""The ImJoy window plugin (web/bioadapt.imjoy.html) in a real ImJoy host: imjoy-core and imjoy-rpc from npm
(tests/imjoy_host/, `npm ci` there; `.ci/run` does it), a small host page, Debian's chromium driven by Playwright.
The plugin runs, opens the bioadapt page in an ImJoy window; in that window a user connects to a real
`bioadapt serve`, sees their project listed and scores patches. Every request stays on 127.0.0.1: anything else
(a CDN, imjoy-core's internal plugins on the web) fails the test.

Skipped without playwright, chromium or the npm install (failed under CI=true). Set BIOADAPT_IMJOY_SCREENSHOT to a path to keep a screenshot
(docs/imjoy-host.png was made that way).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote, urlparse

import pytest
from conftest import free_port, needs, stop_process, wait_for_http
from service_helpers import client_for
# the browser and the service (its module-scoped fixture: a `bioadapt serve` with a model and an image) of the page test
from test_web_page import CHROMIUM, CHROMIUM_FLAGS, WORKSPACE, service, sync_playwright  # noqa: F401

from bioadapt.service.hypha_server import mint_token

ROOT = Path(__file__).resolve().parents[1]
HOST = ROOT / "tests" / "imjoy_host"
PLUGIN = ROOT / "web" / "bioadapt.imjoy.html"
INSTALLED = (HOST / "node_modules" / "imjoy-core" / "dist" / "imjoy-core.min.js").is_file()

pytestmark = needs(
    "Chromium, playwright and imjoy-core (npm)", absent=sync_playwright is None or CHROMIUM is None or not INSTALLED,
    reason="no Python playwright package" if sync_playwright is None else "no chromium binary (apt-get install "
    "chromium)" if CHROMIUM is None else "imjoy-core is not installed: npm ci --prefix tests/imjoy_host")


@pytest.fixture(scope="module")
def host_url(tmp_path_factory):
    """The host page, its base frame, node_modules and the plugin file, on a static server on 127.0.0.1."""
    root = tmp_path_factory.mktemp("imjoy-host")
    for name in ("host.html", "base_frame.html", "node_modules"):
        (root / name).symlink_to(HOST / name)
    (root / PLUGIN.name).symlink_to(PLUGIN)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                               str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/host.html")
        yield f"http://127.0.0.1:{port}/host.html"
    finally:
        stop_process(server)


def test_the_plugin_window_connects_lists_projects_and_scores(hypha_server, service, host_url, tmp_path):
    client = client_for(hypha_server, "imjoyuser", WORKSPACE)
    try:
        project = client.create_project("imjoy", str(service.inputs / "model.zip"),
                                        [{"uri": str(service.inputs / "image.ome.zarr")}])
    finally:
        client.disconnect()
    token = mint_token("imjoyuser", workspaces={WORKSPACE: "r"}, jwt_secret=hypha_server.jwt_secret)
    page_url = service.info["web_url"]
    outside: list[str] = []
    crashes: list[str] = []

    def only_loopback(route):
        if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost") or route.request.url.startswith(
                ("blob:", "data:")):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    from playwright.sync_api import expect

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 960})
            context.route("**/*", only_loopback)
            page = context.new_page()
            page.on("pageerror", lambda error: crashes.append(str(error)))
            page.on("console", lambda message: print(f"browser {message.type}: {message.text}"))  # shown on failure
            page.goto(f"{host_url}?plugin={quote(PLUGIN.name)}&page={quote(page_url, safe='')}")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('plugin bioadapt ran')"
                                   " || document.getElementById('status').textContent.startsWith('error')",
                                   timeout=60_000)
            assert page.text_content("#status") == "plugin bioadapt ran", page.text_content("#status")
            assert page.locator(".imjoy-window[data-name='bioadapt']").count() == 1  # the plugin's window
            window = page.frame_locator(".imjoy-window[data-name='bioadapt'] iframe")
            # filled from the page URL once the window's module script has run: wait for it, a busy machine is slow
            expect(window.locator("#workspace")).to_have_value(WORKSPACE, timeout=60_000)

            window.locator("#token").fill(token)
            window.locator("#connect").click()
            window.locator(f"#projects li[data-project-id='{project['id']}']").click(timeout=30_000)
            window.locator("#n-patches").fill("4")
            window.locator("#patch-size").fill("64")
            window.locator("#mc-passes").fill("2")
            window.locator("#score").click()
            status = window.locator("#score-status")
            status.filter(has_text="done:").wait_for(timeout=180_000)
            assert "done: 4 patches scored" in status.text_content()
            assert window.locator("#patches li[data-patch-id]").count() == 4
            window.locator("#patches li[data-patch-id]").first.click()
            window.locator("#patch-info").filter(has_text="patch #").wait_for(timeout=30_000)
            screenshot = os.environ.get("BIOADAPT_IMJOY_SCREENSHOT")
            page.screenshot(path=screenshot or str(tmp_path / "imjoy-host.png"))
        finally:
            browser.close()
    assert not outside, f"requests left 127.0.0.1: {outside}"
    assert not crashes, crashes
