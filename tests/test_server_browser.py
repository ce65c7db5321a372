"""The search page end to end in a real browser: Debian's headless Chromium driven by Playwright against
`clipcraft serve`'s app on 127.0.0.1. Each interaction of the page, its error and empty states, phone width and
keyboard use; a screenshot of each state is written under the test's tmp dir (printed at the end)."""

from __future__ import annotations

import csv
import io
import shutil
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
FLICKR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed at /usr/bin/chromium"),
]

THUMBS_LOADED = (
    "(n) => { const imgs = Array.from(document.querySelectorAll('#results img'));"
    " return imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0); }"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _photos(images: Path) -> list[tuple[str, str]]:
    """16 photos with captions: real Flickr8k ones when ../shared/data is there (nicer screenshots), else
    generated colour fields with made-up captions. Returns (file name, caption) rows."""
    rows: list[tuple[str, str]] = []
    if (FLICKR / "captions.txt").is_file():
        with open(FLICKR / "captions.txt", newline="") as fh:
            wanted: dict[str, list[str]] = {}
            for row in csv.DictReader(fh):
                if len(wanted) < 16 or row["image"] in wanted:
                    wanted.setdefault(row["image"], []).append(row["caption"])
        for name, caps in wanted.items():
            shutil.copyfile(FLICKR / "images" / name, images / name)
            rows += [(name, c) for c in caps]
        return rows
    rng = np.random.default_rng(0)
    for i in range(16):
        colour = rng.integers(0, 255, 3, dtype=np.uint8)
        Image.fromarray(np.zeros((120, 160, 3), np.uint8) + colour).save(images / f"photo{i}.jpg")
        rows += [(f"photo{i}.jpg", f"a field of colour number {i}"), (f"photo{i}.jpg", f"colour {i}, flat")]
    return rows


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A built index (photos with captions, an exact duplicate, an EXIF-rotated JPEG) served by uvicorn in a
    background thread; yields (base URL, image folder, the first photo's name)."""
    import torch
    import uvicorn

    from clipcraft import create_model
    from clipcraft.search.index import build_index
    from clipcraft.server.app import create_app

    root = tmp_path_factory.mktemp("browser")
    torch.manual_seed(0)
    create_model("tiny").save(root / "model")
    images = root / "images"
    images.mkdir()
    rows = _photos(images)
    first = rows[0][0]
    shutil.copyfile(images / first, images / f"copy-of-{first}")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (300, 150), (240, 200, 20)).save(images / "rotated.jpg", exif=exif.tobytes())
    with open(root / "captions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    build_index(root / "model", images, root / "index", captions=root / "captions.csv", workers=0)
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
    yield f"http://127.0.0.1:{port}", images, first
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("profile")),  # a fresh user-data-dir
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            timeout=60_000,
            viewport={"width": 1280, "height": 900},
        )
        yield context
        context.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("screenshots")
    yield folder
    print(f"\nscreenshots: {folder}")


@pytest.fixture()
def page(browser, server):
    page = browser.new_page()
    page.set_default_timeout(20_000)
    page.goto(server[0] + "/")
    page.wait_for_function("document.getElementById('info').textContent.includes('images')")
    yield page
    page.close()


def _search(page, text: str, k: int = 8) -> None:
    page.fill("#k", str(k))
    page.fill("#q", text)
    page.press("#q", "Enter")
    page.wait_for_function(THUMBS_LOADED, arg=k)


def test_first_load_shows_the_index_and_an_empty_state(page, shots):
    assert "18 images" in page.text_content("#info") and "with captions" in page.text_content("#info")
    assert page.is_visible("#empty") and page.locator("#results li").count() == 0
    assert page.evaluate("document.activeElement.id") == "q"
    page.screenshot(path=str(shots / "01-empty.png"))


def test_text_search_shows_thumbnails_rank_score_name_captions_and_echo(page, server, shots):
    base = server[0]
    _search(page, "a dog on the grass", k=8)
    cards = page.locator("#results li.result")
    assert cards.count() == 8
    assert page.locator("#results .rank").all_text_contents()[:3] == ["#1", "#2", "#3"]
    scores = [float(s) for s in page.locator("#results .score").all_text_contents()]
    assert scores == sorted(scores, reverse=True)
    assert all(n for n in page.locator("#results .name").all_text_contents())
    assert any(c for c in page.locator("#results .caption").all_text_contents())  # the index has captions
    assert page.text_content("#echo-text") == "Results for “a dog on the grass”"
    assert "8 images in" in page.text_content("#status") and not page.is_visible("#empty")
    # thumbnails are the server's small JPEGs, not the originals
    src = page.get_attribute("#results li img", "src")
    assert src.startswith("/api/thumbs/") and "size=256" in src
    assert page.url == base + "/?q=a+dog+on+the+grass&k=8"
    page.screenshot(path=str(shots / "02-text-results.png"), full_page=True)


def test_a_new_query_clears_old_results_and_shows_loading(page, shots):
    _search(page, "a red car", k=6)
    # hold the next answer back to see the loading state
    held = []
    page.route("**/api/search/text?*", lambda route: held.append(route))  # answered when we say so
    page.fill("#q", "two children")
    page.press("#q", "Enter")
    page.wait_for_selector("#status.loading")
    assert page.locator("#results li").count() == 0  # old results are gone at once
    assert page.get_attribute("#results", "aria-busy") == "true"
    assert page.text_content("#status") == "Searching…"
    page.screenshot(path=str(shots / "03-loading.png"))
    held[0].continue_()
    page.wait_for_function(THUMBS_LOADED, arg=6)
    page.unroute("**/api/search/text?*")
    assert not page.is_visible("#status.loading")


def test_errors_are_shown_next_to_their_control_and_clear_old_results(page, server, shots):
    _search(page, "a dog", k=4)
    page.fill("#q", "   ")
    page.press("#q", "Enter")
    assert "Type what to look for" in page.text_content("#q-error")
    page.fill("#q", "a dog")
    page.fill("#k", "0")
    page.press("#q", "Enter")
    assert "from 1 to 100" in page.text_content("#opt-error") and page.text_content("#q-error") == ""
    # a server-side refusal (k over the limit, from a shared URL): the message under the options
    page.goto(server[0] + "/?q=a+dog&k=1000")
    page.wait_for_function("document.getElementById('opt-error').textContent.length > 0")
    assert "k must be between 1 and 100" in page.text_content("#opt-error")
    assert page.locator("#results li").count() == 0
    page.screenshot(path=str(shots / "04-error.png"))
    # the server is gone: say so
    page.route("**/api/search/text?*", lambda route: route.abort())
    page.fill("#k", "4")
    page.fill("#q", "a cat")
    page.press("#q", "Enter")
    page.wait_for_function("document.getElementById('q-error').textContent.includes('Could not reach')")
    page.unroute("**/api/search/text?*")


def test_no_results_is_a_clear_state(page, shots):
    page.route(
        "**/api/search/text?*",
        lambda route: route.fulfill(json={"query": "x", "k": 5, "dedup": None, "dropped": 0, "results": []}),
    )
    page.fill("#q", "nothing at all")
    page.press("#q", "Enter")
    page.wait_for_function("document.getElementById('status').textContent.includes('No images found')")
    assert page.locator("#results li").count() == 0
    page.screenshot(path=str(shots / "05-no-results.png"))
    page.unroute("**/api/search/text?*")


def test_large_view_with_path_captions_zero_shot_and_keyboard(page, shots):
    _search(page, "a dog running", k=6)
    first = page.locator("#results li .open").first
    first.focus()
    page.keyboard.press("Enter")  # the card is a button: Enter opens it
    page.wait_for_selector("#viewer[open]")
    page.wait_for_function(
        "document.getElementById('v-img').complete && document.getElementById('v-img').naturalWidth > 0"
    )
    name = page.locator("#results .name").first.text_content()
    assert page.text_content("#v-name") == name
    assert page.text_content("#v-rank").startswith("#1 of 6")
    assert page.locator("#v-captions li").count() >= 1
    assert page.get_attribute("#v-open", "href").startswith("/api/images/")
    assert "size=1024" in page.get_attribute("#v-img", "src")
    # zero-shot labels on this result
    page.fill("#v-labels", "dog, cat, car")
    page.press("#v-labels", "Enter")
    page.wait_for_selector("#v-zs-results li")
    probs = [float(x) for x in page.locator("#v-zs-results .value").all_text_contents()]
    labels = page.locator("#v-zs-results .name").all_text_contents()
    assert sorted(labels) == ["car", "cat", "dog"] and sum(probs) == pytest.approx(1.0, abs=0.01)
    page.screenshot(path=str(shots / "06-large-view-zero-shot.png"))
    # an empty label list is refused next to the field
    page.fill("#v-labels", " ")
    page.press("#v-labels", "Enter")
    assert "one or more labels" in page.text_content("#v-zs-error")
    # arrows move through the results; Escape closes and focus returns to the card
    page.focus("#v-close")
    page.keyboard.press("ArrowRight")
    assert page.text_content("#v-rank").startswith("#2 of 6")
    page.keyboard.press("Escape")
    page.wait_for_selector("#viewer:not([open])", state="attached")
    assert page.evaluate("document.activeElement.closest('li') === document.querySelector('#results li')")


def test_more_like_this_near_duplicates_urls_and_back_forward(page, server, shots):
    base, _, first = server
    _search(page, "a dog", k=5)
    text_url = page.url
    # more like the duplicated photo: it and its copy come first
    page.goto(base + "/?q=x&k=5")  # a shared URL runs its search on load
    page.wait_for_function(THUMBS_LOADED, arg=5)
    assert page.input_value("#q") == "x"
    page.goto(text_url)
    page.wait_for_function(THUMBS_LOADED, arg=5)
    ids = page.evaluate(
        "fetch('/api/search/text?q=' + encodeURIComponent('anything') + '&k=100').then(r => r.json())"
    )
    row = next(r["id"] for r in ids["results"] if r["name"] == first)
    page.goto(base + f"/?like={row}&k=5")
    page.wait_for_function(THUMBS_LOADED, arg=5)
    names = page.locator("#results .name").all_text_contents()
    assert sorted(names[:2]) == sorted([first, f"copy-of-{first}"])
    assert page.text_content("#echo-text") == f"More like {first}"
    # the "More like this" button of a card
    page.locator("#results li .like").nth(2).click()
    page.wait_for_url("**/?like=*&k=5")
    page.wait_for_function(THUMBS_LOADED, arg=5)
    liked = page.url
    # hide near-duplicates: the copy disappears and the page says so
    page.goto(base + f"/?like={row}&k=5")
    page.wait_for_function(THUMBS_LOADED, arg=5)
    page.check("#dedup-on")
    page.fill("#dedup", "0.999")
    page.click("#go")
    page.wait_for_url("**dedup=0.999")
    page.wait_for_function("document.getElementById('status').textContent.includes('near-duplicate hidden')")
    page.wait_for_function(THUMBS_LOADED, arg=5)
    names = page.locator("#results .name").all_text_contents()
    assert (first in names) != (f"copy-of-{first}" in names)
    page.screenshot(path=str(shots / "07-more-like-this-dedup.png"), full_page=True)
    # back and forward walk the searches
    page.go_back()
    page.wait_for_url(f"**/?like={row}&k=5")
    page.wait_for_function(THUMBS_LOADED, arg=5)
    assert not page.is_checked("#dedup-on")
    page.go_back()
    page.wait_for_url(liked)
    page.go_forward()
    page.wait_for_url(f"**/?like={row}&k=5")
    page.go_forward()
    page.wait_for_url("**dedup=0.999")
    page.wait_for_function(THUMBS_LOADED, arg=5)
    assert page.is_checked("#dedup-on") and page.input_value("#dedup") == "0.999"


def _image_bytes(images: Path, name: str) -> list[int]:
    return list((images / name).read_bytes())


def test_image_queries_by_picker_drop_and_paste_and_zero_shot_on_the_upload(page, server, shots, tmp_path):
    _, images, first = server
    # the file picker
    page.fill("#k", "4")
    page.set_input_files("#file", str(images / first))
    page.wait_for_function(THUMBS_LOADED, arg=4)
    names = page.locator("#results .name").all_text_contents()
    assert first in names[:2]
    assert page.text_content("#echo-text") == f"Images like {first}"
    assert page.evaluate("document.getElementById('echo-img').naturalWidth > 0")
    assert "image=upload" in page.url
    # zero-shot labels on the uploaded image
    page.fill("#echo-labels", "a dog, a cat")
    page.press("#echo-labels", "Enter")
    page.wait_for_selector("#echo-zs-results li")
    assert page.locator("#echo-zs-results li").count() == 2
    page.screenshot(path=str(shots / "08-upload-zero-shot.png"))
    # best captions for the uploaded image
    page.select_option("#target", "captions")
    page.click("#go")
    page.wait_for_selector("#caption-results tr.row")
    assert page.locator("#caption-results tr.row").count() == 4
    assert page.locator("#results li").count() == 0
    page.select_option("#target", "images")
    # drag and drop an image onto the page
    data = _image_bytes(images, "rotated.jpg")
    page.evaluate(
        """(bytes) => {
            const file = new File([new Uint8Array(bytes)], "dropped.jpg", {type: "image/jpeg"});
            const dt = new DataTransfer(); dt.items.add(file);
            document.body.dispatchEvent(new DragEvent("dragenter", {dataTransfer: dt, bubbles: true}));
            window.__dropShown = !document.getElementById("drop").hidden;
            document.body.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""",
        data,
    )
    assert page.evaluate("window.__dropShown") and page.is_hidden("#drop")
    page.wait_for_function("document.getElementById('echo-text').textContent === 'Images like dropped.jpg'")
    page.wait_for_function(THUMBS_LOADED, arg=4)
    assert page.locator("#results .name").first.text_content() == "rotated.jpg"
    # paste an image
    page.evaluate(
        """(bytes) => {
            const file = new File([new Uint8Array(bytes)], "pasted.png", {type: "image/jpeg"});
            const dt = new DataTransfer(); dt.items.add(file);
            document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: dt, bubbles: true, cancelable: true}));
        }""",
        _image_bytes(images, first),
    )
    page.wait_for_function("document.getElementById('echo-text').textContent === 'Images like pasted.png'")
    page.wait_for_function(THUMBS_LOADED, arg=4)
    # back returns to the dropped image's results (kept in memory for this page)
    page.go_back()
    page.wait_for_function("document.getElementById('echo-text').textContent === 'Images like dropped.jpg'")
    page.wait_for_function(THUMBS_LOADED, arg=4)
    # a file that is not an image is refused next to the query box, before any upload
    (tmp_path / "notes.txt").write_text("hello")
    page.set_input_files("#file", str(tmp_path / "notes.txt"))
    assert "not an image" in page.text_content("#q-error")
    page.screenshot(path=str(shots / "09-upload-refused.png"))
    # a reloaded image query cannot be rebuilt: the page says what to do
    page.reload()
    page.wait_for_function("document.getElementById('q-error').textContent.includes('again')")


def test_phone_width(browser, server, shots):
    page = browser.new_page()
    page.set_viewport_size({"width": 390, "height": 844})
    try:
        page.set_default_timeout(20_000)
        page.goto(server[0] + "/?q=a+dog&k=6")
        page.wait_for_function(THUMBS_LOADED, arg=6)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        columns = page.evaluate("getComputedStyle(document.getElementById('results')).gridTemplateColumns")
        assert len(columns.split()) == 2
        box = page.locator("#go").bounding_box()
        assert box["x"] + box["width"] <= 390 and box["height"] >= 36  # reachable, big enough to tap
        page.screenshot(path=str(shots / "10-phone.png"))
        page.locator("#results li .open").first.click()
        page.wait_for_selector("#viewer[open]")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        page.screenshot(path=str(shots / "11-phone-large-view.png"))
    finally:
        page.close()


def test_keyboard_only_labels_and_focus_order(page):
    # every control has a label a screen reader can read
    unlabelled = page.evaluate(
        """() => Array.from(document.querySelectorAll('input, select, button'))
            .filter(e => e.offsetParent !== null || e.closest('dialog') === null)
            .filter(e => e.type !== 'file' && !(e.closest('template')))
            .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
            .map(e => e.id || e.outerHTML.slice(0, 60))"""
    )
    assert unlabelled == []
    # "/" focuses the query box; Tab walks the form in reading order
    page.locator("body").click(position={"x": 5, "y": 400})
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "q"
    order = []
    for _ in range(5):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id"))
    assert order == ["pick", "go", "k", "dedup-on", "dedup"] or order[:4] == ["pick", "go", "k", "dedup-on"]
    # Enter searches; Tab reaches the results
    page.focus("#q")
    page.keyboard.type("a dog")
    page.fill("#k", "3")
    page.focus("#q")
    page.keyboard.press("Enter")
    page.wait_for_function(THUMBS_LOADED, arg=3)
    page.focus("#results li .open")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "like"
    page.keyboard.press("Enter")  # more like this, by keyboard
    page.wait_for_url("**/?like=*")


def test_the_page_loads_nothing_from_other_sites(browser, server):
    page = browser.new_page()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    try:
        page.goto(server[0] + "/?q=a+dog&k=4")
        page.wait_for_function(THUMBS_LOADED, arg=4)
        page.goto(server[0] + "/docs")
        page.wait_for_selector(".swagger-ui .opblock", timeout=20_000)  # Swagger UI rendered, offline
    finally:
        page.close()
    assert requests and all(u.startswith(server[0]) or u.startswith("data:") for u in requests), requests


def test_old_page_flows_still_work_image_file_bytes(server):
    """The image route serves the original bytes (the large view's 'Open the original' link)."""
    import httpx

    base, images, first = server
    body = httpx.get(base + "/api/search/text", params={"q": "x", "k": 30}).json()
    row = next(r for r in body["results"] if r["name"] == first)
    got = httpx.get(base + row["url"])
    assert got.status_code == 200 and got.content == (images / first).read_bytes()
    assert Image.open(io.BytesIO(got.content)).format == "JPEG"
