"""The web pane in a real headless Chromium (the distribution's `chromium`, driven by
Playwright; never a downloaded browser) against a real coordinator and a real node
serving the real SmolLM2 model: sign in, see the node and its model, watch a request
appear live, make and revoke a key. A second real node agent reports a recorded H100
through the FAKE NVML module (`tests/node/fake_nvml.py`: there is no GPU here), so the
GPU columns are shown and checked too. Screenshots go to test-artifacts/ui/ (the path
is printed) for a person to look at."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.mesh import Mesh, free_port, mesh_at, spawn

pytestmark = pytest.mark.slow

MODEL = "smollm2"
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("MESHGATE_ARTIFACTS", ROOT / "test-artifacts")) / "ui"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (Debian: apt-get install chromium; scripts/test.sh does)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Mesh]:
    for mesh in mesh_at(tmp_path_factory.mktemp("pane")):
        mesh.start_coordinator()
        mesh.key = mesh.make_key("pane-e2e")
        enrolled = mesh.enroll("node-a")
        assert enrolled.returncode == 0, enrolled.stderr
        mesh.start_node("node-a", f"{MODEL}={model_path}")
        enrolled = mesh.enroll("gpu-box", mesh.token("--label", "gpu=h100"))
        assert enrolled.returncode == 0, enrolled.stderr
        mesh.nodes["gpu-box"] = spawn(
            "node", ["run", "--state-dir", str(mesh.root / "gpu-box"), "--proxy-port",
                     str(free_port()), "--telemetry-period", "0.5"],
            mesh.root / "gpu-box.log",
            env={"MESHGATE_NVML_MODULE": "tests.node.fake_nvml:h100_moving_energy"})
        mesh.wait_serving(MODEL)
        yield mesh


@pytest.fixture(scope="module")
def page(mesh: Mesh) -> Iterator[sync_api.Page]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            context = browser.new_context(viewport={"width": 1480, "height": 1000})
            page = context.new_page()
            page.on("dialog", lambda dialog: dialog.accept())
            yield page
        finally:
            browser.close()
    print(f"\nweb pane screenshots: {ARTIFACTS}")


def ui(mesh: Mesh) -> str:
    return f"http://127.0.0.1:{mesh.api_port}/ui"


def shot(page: sync_api.Page, name: str) -> None:
    path = ARTIFACTS / f"{name}.png"
    page.evaluate("window.scrollTo(0, 0)")  # the sticky header stays at the top of the shot
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


def test_1_a_wrong_key_is_refused_and_the_admin_key_signs_in(
    mesh: Mesh, page: sync_api.Page
) -> None:
    expect = sync_api.expect
    page.goto(ui(mesh))
    page.fill("#admin_key", mesh.key)  # an app's key is not an admin key
    page.click("button[type=submit]")
    expect(page.locator(".error")).to_contain_text("not a live admin key")
    shot(page, "1-sign-in")
    page.fill("#admin_key", (mesh.coord_state / "admin.key").read_text().strip())
    page.click("button[type=submit]")
    expect(page.locator("#fleet")).to_be_visible()
    cookie = next(c for c in page.context.cookies() if c["name"] == "meshgate_admin")
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert "mga_" not in page.content()  # nothing secret in the page


def test_2_the_real_node_shows_with_the_real_model_loaded(
    mesh: Mesh, page: sync_api.Page
) -> None:
    expect = sync_api.expect
    expect(page.locator("#fleet .node")).to_have_count(2, timeout=30_000)
    node = page.locator("#fleet .node", has=page.locator(".chip.loaded"))
    expect(node.locator(".chip.loaded")).to_contain_text(MODEL)
    expect(node.locator(".stats")).to_contain_text("RTT")
    gpu = page.locator("#fleet .node", has_text="gpu=h100").locator(".gpu")
    expect(gpu).to_contain_text("H100")  # the recorded H100 of the fake NVML
    expect(gpu).to_contain_text("°C")
    expect(gpu).to_contain_text(" W")
    expect(gpu).to_contain_text("Gen")
    expect(page.locator("#models")).to_contain_text(MODEL)
    expect(page.locator("#live-dot.on")).to_be_visible()  # the SSE stream is flowing
    shot(page, "2-fleet")


def test_3_a_request_appears_live_without_a_reload(mesh: Mesh, page: sync_api.Page) -> None:
    expect = sync_api.expect
    client = openai.OpenAI(base_url=mesh.api, api_key=mesh.key, max_retries=0)
    done = threading.Event()

    def ask() -> None:
        try:
            # SmolLM2's end tokens (<|endoftext|> 0, <|im_end|> 2) banned: it runs the whole
            # max_tokens, long enough for the pane's once-a-second updates to catch it
            stream = client.chat.completions.create(
                model=MODEL, stream=True, max_tokens=120, temperature=0,
                logit_bias={"0": -100, "2": -100},
                messages=[{"role": "user", "content": "Count from 1 to 300, one per line."}],
                extra_headers={"X-Request-Id": "pane-req-1"})
            for _ in stream:
                pass
        finally:
            done.set()

    url_before = page.url
    worker = threading.Thread(target=ask)
    worker.start()
    try:
        expect(page.locator("#inflight")).to_contain_text("pane-req-1", timeout=20_000)
        shot(page, "3-in-flight")
    finally:
        worker.join(120)
    assert done.is_set()
    recent = page.locator("#recent tr", has_text="pane-req-1")
    expect(recent).to_contain_text("ok", timeout=10_000)
    expect(recent).to_contain_text(MODEL)
    expect(page.locator("#usage")).to_contain_text("pane-e2e", timeout=10_000)
    assert page.url == url_before  # live, not reloaded
    shot(page, "4-after-request")


def test_4_a_key_made_in_the_pane_works_and_its_revoke_holds_at_once(
    mesh: Mesh, page: sync_api.Page
) -> None:
    expect = sync_api.expect
    page.fill("form[hx-post='/ui/keys'] input[name=name]", "pane-made")
    page.click("form[hx-post='/ui/keys'] button")
    secret = page.locator("#new-key")
    expect(secret).to_contain_text("mg_")
    key = secret.inner_text().strip()
    models = f"{mesh.api}/models"
    assert httpx.get(models, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    row = page.locator("#keys tr[data-key='pane-made']")
    expect(row).to_contain_text("active")
    row.locator("button", has_text="Revoke").click()
    expect(page.locator("#keys tr[data-key='pane-made']")).to_contain_text("revoked")
    assert httpx.get(models, headers={"Authorization": f"Bearer {key}"}).status_code == 401
    shot(page, "5-key-revoked")


def test_5_top_shows_the_same_fleet_in_a_terminal(mesh: Mesh) -> None:
    from typer.testing import CliRunner

    from coordinator.cli import app

    result = CliRunner().invoke(app, ["top", "--once", "--url", f"http://127.0.0.1:{mesh.api_port}",
                                      "--admin-key-file", str(mesh.coord_state / "admin.key")],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.stderr
    assert "2 node(s) connected" in result.stdout
    assert "H100" in result.stdout
    assert MODEL in result.stdout
    (ARTIFACTS / "top.txt").write_text(result.stdout)
    print(f"top: {ARTIFACTS / 'top.txt'}")
