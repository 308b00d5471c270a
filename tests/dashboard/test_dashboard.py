"""The fleet dashboard at /ui, in a real headless Chromium against a real gateway over fake neurons.

The gateway has an admin key, so the page must ask for it; then it renders the nodes and models,
a load started from the page shows its progress and completes, an unload disappears from the
page, and a screenshot is saved (its path is printed; under the test's tmp dir).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway_client import models_toml
from tests.support.gateway_procs import GatewayDaemon, cortex_toml, run_fake_neuron, run_gateway
from tests.support.procs import Daemon

ADMIN_KEY = "s3cret-dashboard"
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str:
    for candidate in (os.environ.get("CORTEX_TEST_CHROMIUM"), "chromium", "chromium-browser", "/usr/bin/chromium"):
        if candidate and (path := shutil.which(candidate)):
            return path
    pytest.skip("no Chromium on this machine: scripts/setup.sh installs Debian's `chromium` with apt-get (needs root)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    executable = _chromium()
    with playwright_api.sync_playwright() as pw:
        try:
            chromium = pw.chromium.launch(executable_path=executable, args=BROWSER_ARGS)
        except Exception as exc:  # a broken browser install: say so rather than fail obscurely
            pytest.skip(f"Chromium at {executable} does not start: {str(exc).splitlines()[0]}")
        yield chromium
        chromium.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[GatewayDaemon, Daemon, Daemon]]:
    a = {"name": "a", "devices": [{"vram_total_mb": 24000}], "preloaded": ["m1"], "load_delay_s": 3.0}
    b = {"name": "b", "devices": [{"vram_total_mb": 16000}, {"vram_total_mb": 16000}], "load_delay_s": 3.0}
    catalogue = models_toml({"id": "m1"}, {"id": "m2", "vram_mb": 2000})
    with run_fake_neuron(tmp_path, a) as fa, run_fake_neuron(tmp_path, b) as fb:
        config = cortex_toml({"a": fa.url, "b": fb.url}, extra_gateway=f'admin_key = "{ADMIN_KEY}"')
        with run_gateway(tmp_path, config, catalogue, wait_healthy=0) as gateway:
            yield gateway, fa, fb


def _admin_state(gateway: GatewayDaemon) -> dict[str, Any]:
    request = urllib.request.Request(f"{gateway.url}/admin/state", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return json.loads(resp.read())


def test_the_page_shows_the_fleet_and_loads_and_unloads(browser: Any, fleet: Any, tmp_path: Path) -> None:
    gateway, _, _ = fleet
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.goto(f"{gateway.url}/ui")

    # An admin key is configured: the page asks for it, then renders with it as a bearer token.
    page.locator("#admin-key").fill(ADMIN_KEY)
    page.locator("#key-form button").click()
    row_m1 = page.locator('#models tr[data-model="m1"][data-node="a"]')
    row_m1.locator(".status", has_text="loaded").wait_for()
    for node in ("a", "b"):
        page.locator(f'.card[data-node="{node}"]', has_text="healthy").wait_for()
    assert page.locator('.card[data-node="b"] .device').count() == 2
    assert "23.4 GB" in page.locator('.card[data-node="a"]').inner_text()

    # Traffic shows up as live figures (the gateway's own metrics): tok/s and TTFT for m1.
    for _ in range(3):
        _stream_chat(gateway, "m1")
    row_m1.locator(".toks", has_text=".").wait_for()
    row_m1.locator(".ttft", has_text="ms").wait_for()
    assert row_m1.locator(".errors").inner_text() == "0.0%"

    # Load from the page: progress is visible while the neuron loads, then the row turns loaded.
    page.locator("#load-model").select_option("m2")
    page.locator("#load-node").select_option("b")
    page.locator("#load-button").click()
    row_m2 = page.locator('#models tr[data-model="m2"][data-node="b"]')
    row_m2.locator(".status progress").wait_for()
    row_m2.locator(".status", has_text="loaded").wait_for(timeout=30_000)
    page.locator("#notice", has_text="loaded m2 on b").wait_for()
    assert any(m["id"] == "m2" and m["status"] == "loaded" for m in _nodes(gateway)["b"]["models"])

    screenshot = tmp_path / "dashboard.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"dashboard screenshot: {screenshot}")
    assert screenshot.stat().st_size > 10_000

    # Unload from the page: the row goes away, and the gateway agrees.
    row_m2.locator("button.unload").click()
    row_m2.wait_for(state="detached", timeout=30_000)
    page.locator("#notice", has_text="unloaded m2 from b").wait_for()
    assert not any(m["id"] == "m2" for m in _nodes(gateway)["b"]["models"])

    # Pin and unpin from the page.
    row_m1.locator("button.pin", has_text="Pin").click()
    row_m1.locator(".pinned", has_text="yes").wait_for()
    row_m1.locator("button.pin", has_text="Unpin").click()
    row_m1.locator("button.pin", has_text="Pin").wait_for()
    assert problems == []


def _stream_chat(gateway: GatewayDaemon, model: str) -> None:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(f"{gateway.url}/v1/chat/completions", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert b"[DONE]" in resp.read()


def _nodes(gateway: GatewayDaemon) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in _admin_state(gateway)["nodes"]}


def test_the_page_needs_no_key_when_none_is_set_and_live_figures_answer(tmp_path: Path) -> None:
    spec = {"name": "a", "devices": [{"vram_total_mb": 24000}], "preloaded": ["m1"]}
    with run_fake_neuron(tmp_path, spec) as fa:
        config = cortex_toml({"a": fa.url})
        with run_gateway(tmp_path, config, models_toml({"id": "m1"}), wait_healthy=1) as gateway:
            with urllib.request.urlopen(f"{gateway.url}/ui/", timeout=5) as resp:
                html = resp.read().decode()
                assert resp.headers["Content-Type"].startswith("text/html")
                assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
            assert '<script src="/ui/app.js"' in html and "http" not in html.replace("http-equiv", "")
            with urllib.request.urlopen(f"{gateway.url}/admin/live", timeout=5) as resp:
                live = json.loads(resp.read())
            assert set(live) == {"window_s", "models", "events"}
