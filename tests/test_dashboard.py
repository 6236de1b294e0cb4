"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by playwright; no
browser is ever downloaded) against a real gateway with an API key in front of a real 2-node
cluster running a pipelined and a single-node (native MTP) instance.

Checks what a person sees: both nodes with memory bars, both instances with engine, reason and
their stages drawn as a pipeline, the "try it" box streaming an answer, and tok/s and acceptance
changing without a reload. The screenshot is saved to ``test-artifacts/dashboard.png`` (or
``$MACMESH_TEST_ARTIFACTS``). Without the key the page is a 401 with a Basic challenge.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import requests
from helpers.cluster_client import launch
from helpers.daemons import DaemonCluster
from helpers.gateway_processes import REPO, start_gateway

MODEL = "macmesh-tiny"
KEY = "sk-dashboard"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(os.environ.get("MACMESH_TEST_ARTIFACTS", REPO / "test-artifacts"))
WAIT_MS = 60_000  # generous: 2 shared cores

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is missing"
)
if not Path(CHROMIUM).exists():
    pytest.skip(
        "no Chromium at /usr/bin/chromium (./scripts/test installs Debian's chromium when root)",
        allow_module_level=True,
    )


def browser_env() -> dict[str, str]:
    # Not the OpenBLAS that scripts/_bootstrap.sh preloads for MLX: Chromium's renderers crash
    # with it ("Target crashed").
    return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    with DaemonCluster(root) as cluster:
        coord = cluster.start("studio-1", mdns=False)
        other = cluster.start("studio-2", mdns=False, peers=[coord.address])
        cluster.wait_connected([coord, other], timeout=15)
        _, pipelined = launch(coord.address, MODEL, min_nodes=2)
        _, single = launch(coord.address, MODEL, min_nodes=1)
        gw = start_gateway(root, coord.address, "--api-key", KEY)
        try:
            names = {coord.node_id: "studio-1", other.node_id: "studio-2"}
            yield {"url": gw.url, "pipelined": pipelined, "single": single, "names": names}
        finally:
            gw.stop()


@pytest.fixture
def browser():
    # One browser per test: playwright's answers to auth challenges leak between contexts of
    # one Chromium (a context without credentials made the next one's fail).
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=CHROMIUM, args=FLAGS, headless=True, env=browser_env()
        )
        try:
            yield chromium
        finally:
            chromium.close()


def test_the_page_needs_the_key(setup, browser):
    bare = requests.get(setup["url"] + "/", timeout=30)
    assert bare.status_code == 401 and bare.headers["WWW-Authenticate"].startswith("Basic")
    assert "API key" in bare.json()["error"]["message"]
    page = browser.new_context().new_page()
    try:  # Chromium gets the challenge and has no key to answer with
        status = page.goto(setup["url"] + "/").status
    except playwright_api.Error as exc:
        status = str(exc)
    assert status == 401 or "ERR_INVALID_AUTH_CREDENTIALS" in str(status)
    assert not page.locator(".node").count()


def test_dashboard_shows_the_cluster_and_updates_live(setup, browser):
    context = browser.new_context(
        http_credentials={"username": "macmesh", "password": KEY},
        viewport={"width": 1280, "height": 1000},
    )
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        response = page.goto(setup["url"] + "/")
        assert response.status == 200
        page.wait_for_function("document.querySelectorAll('.node').length === 2", timeout=WAIT_MS)
        page.wait_for_function(
            "document.querySelectorAll('.instance').length === 2", timeout=WAIT_MS
        )

        names = page.locator(".node h3").all_inner_texts()
        assert sorted(n.split()[0] for n in names) == ["studio-1", "studio-2"]
        for width in page.locator(".node .mem-used").evaluate_all(
            "bars => bars.map(b => b.style.width)"
        ):
            assert width.endswith("%") and 0 < float(width[:-1]) <= 100, width
        assert all("GiB used of" in t for t in page.locator(".node .mem-text").all_inner_texts())

        single, pipelined = setup["single"], setup["pipelined"]
        piped = page.locator(f'[data-instance="{pipelined.instance_id}"]')
        assert piped.locator(".badge").inner_text() == "pipeline"
        assert piped.locator(".reason").inner_text() == pipelined.engine_reason
        stages = piped.locator(".stage").all_inner_texts()
        assert len(stages) == 2 and piped.locator(".arrow").count() == 1
        expected = [setup["names"][s.node_id] for s in pipelined.stages]
        assert [s.split("\n")[0] for s in stages] == expected  # in pipeline order
        first, second = pipelined.stages
        assert stages[0].endswith(f"layers {first.start_layer}–{first.end_layer - 1}")
        assert stages[1].endswith(f"layers {second.start_layer}–{second.end_layer - 1}")
        mtp = page.locator(f'[data-instance="{single.instance_id}"]')
        assert mtp.locator(".badge").inner_text() == "native_mtp"
        assert mtp.locator(".reason").inner_text() == single.engine_reason
        assert mtp.locator(".stage").count() == 1
        assert mtp.locator(".acceptance").inner_text() == "–"  # nothing served yet

        page.evaluate("window.__noReload = true")
        refreshes = int(page.evaluate("document.body.dataset.refreshes"))

        # try it: stream an answer from the native-MTP instance
        page.select_option("#chat-model", single.instance_id)
        page.fill("#chat-max", "24")
        page.fill("#chat-input", "What does the os module do?")
        page.click("#chat-send")
        page.wait_for_selector(".msg.assistant .stats", timeout=WAIT_MS)
        stats = page.locator(".msg.assistant .stats").inner_text()
        assert stats.startswith("native_mtp") and "tok/s" in stats and "acceptance" in stats
        assert page.locator(".msg.assistant .text").inner_text().strip()
        assert not page.locator(".msg.assistant .error").count()

        # the instance's live numbers change on the page without a reload
        page.wait_for_function(
            f"""() => {{
                const card = document.querySelector('[data-instance="{single.instance_id}"]');
                return card && card.querySelector('.acceptance').textContent.endsWith('%')
                    && parseFloat(card.querySelector('.tps').textContent) > 0;
            }}""",
            timeout=WAIT_MS,
        )
        assert page.evaluate("window.__noReload") is True
        assert int(page.evaluate("document.body.dataset.refreshes")) > refreshes
        assert errors == []

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
    finally:
        context.close()
