"""End to end in a real browser: Debian's headless Chromium driven by Playwright against `clipcraft serve`'s app."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed at /usr/bin/chromium"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A built index served by uvicorn on 127.0.0.1 in a background thread; yields (base URL, image dir)."""
    import torch
    import uvicorn

    from clipcraft import create_model
    from clipcraft.search.index import build_index
    from clipcraft.server.app import create_app

    root = tmp_path_factory.mktemp("browser")
    torch.manual_seed(0)
    create_model("tiny").save(root / "model")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(np.zeros((48, 48, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)).save(
            root / "images" / f"photo{i}.png"
        )
    (root / "captions.txt").write_text("a dog\na cat\na red car\n")
    build_index(root / "model", root / "images", root / "index", captions=root / "captions.txt", workers=0)
    port = free_port()
    config = uvicorn.Config(create_app(root / "index"), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start within 30 s")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", root / "images"
    srv.should_exit = True
    thread.join(timeout=10)


def test_search_upload_and_zero_shot_in_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright

    base, images = server
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh user-data-dir
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            timeout=60_000,
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            page.goto(base + "/")
            page.wait_for_function("document.getElementById('info').textContent.includes('8 images')")

            # type a query and see the result images load
            page.fill("#q", "a dog on the grass")
            page.fill("#k", "5")
            page.click("#text-go")
            page.wait_for_selector("#results figure.result img")
            page.wait_for_function(
                "Array.from(document.querySelectorAll('#results img')).length === 5 && "
                "Array.from(document.querySelectorAll('#results img')).every(i => i.complete && i.naturalWidth > 0)"
            )
            captions = page.locator("#results figcaption").all_text_contents()
            assert captions[0].startswith("#1") and "photo" in captions[0]

            # upload an image: the most similar image is itself
            page.set_input_files("#image-file", str(images / "photo3.png"))
            page.click("#image-go")
            page.wait_for_function(
                "document.querySelector('#results figcaption')?.textContent.includes('photo3')"
            )
            assert "photo3.png" in page.locator("#results figcaption").first.text_content()

            # best captions for the uploaded image
            page.select_option("#target", "captions")
            page.click("#image-go")
            page.wait_for_selector("#caption-results tr.row")
            assert len(page.locator("#caption-results tr.row").all()) == 3

            # zero-shot: labels + an image -> probabilities
            page.fill("#labels", "dog, cat, car")
            page.set_input_files("#zs-file", str(images / "photo1.png"))
            page.click("#zs-go")
            page.wait_for_selector("#zs-results tr.row")
            labels = page.locator("#zs-results td.name").all_text_contents()
            probs = [float(x) for x in page.locator("#zs-results td.value").all_text_contents()]
            assert sorted(labels) == ["car", "cat", "dog"]
            assert sum(probs) == pytest.approx(1.0, abs=0.01)

            # a bad request shows the server's message, not a crash
            page.fill("#q", "   ")
            page.click("#text-go")
            page.wait_for_function("document.getElementById('error').textContent.includes('empty')")
        finally:
            browser.close()
