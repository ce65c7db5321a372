"""The web API with FastAPI's TestClient: normal use, and hostile requests that must get a 4xx, never a 500."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


def png_bytes(colour=(200, 30, 30), size=(40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((*size, 3), np.uint8) + np.array(colour, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    import torch
    from fastapi.testclient import TestClient

    from clipcraft import create_model
    from clipcraft.search.index import build_index
    from clipcraft.server.app import create_app
    from clipcraft.server.limits import Limits

    root = tmp_path_factory.mktemp("server")
    torch.manual_seed(0)
    create_model("tiny").save(root / "model")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        (root / "images" / f"{i}.png").write_bytes(png_bytes(tuple(int(c) for c in rng.integers(0, 255, 3))))
    (root / "secret.txt").write_text("do not serve me")
    (root / "captions.txt").write_text("a dog\na cat\na red car\n")
    build_index(root / "model", root / "images", root / "index", captions=root / "captions.txt", workers=0)
    app = create_app(root / "index", limits=Limits(max_k=50, max_upload_bytes=200_000))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_page_info_and_openapi(client):
    import re

    page = client.get("/").text
    assert '<form id="search" role="search"' in page
    assets = re.findall(r'(?:src|href)=["\']([^"\'#]+)["\']', page)
    assert "/static/app.js" in assets and "/static/app.css" in assets
    for url in assets:  # the page loads nothing from another site
        assert not url.startswith(("http:", "https:", "//")), url
        if not url.startswith("data:"):
            assert client.get(url).status_code == 200, url
    assert client.get("/api/info").json()["images"] == 6
    schema = client.get("/openapi.json").json()
    assert "/api/search/text" in schema["paths"] and "/api/zeroshot" in schema["paths"]
    assert client.get("/docs").status_code == 200


def test_text_search_and_image_urls(client):
    body = client.get("/api/search/text", params={"q": "a red square", "k": 4}).json()
    rows = body["results"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    image = client.get(rows[0]["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"


def test_image_search_finds_itself_and_captions(client):
    data = png_bytes((10, 200, 10))
    first = client.post(
        "/api/search/image", files={"file": ("q.png", data, "image/png")}, data={"k": "6"}
    ).json()
    assert len(first["results"]) == 6
    caps = client.post(
        "/api/search/image",
        files={"file": ("q.png", data, "image/png")},
        data={"k": "2", "target": "captions"},
    ).json()
    assert caps["target"] == "captions" and len(caps["results"]) == 2


def test_zero_shot_probabilities_sum_to_one(client):
    r = client.post(
        "/api/zeroshot", files={"file": ("q.png", png_bytes(), "image/png")}, data={"labels": "dog, cat, car"}
    )
    assert r.status_code == 200
    results = r.json()["results"]
    assert sorted(x["label"] for x in results) == ["car", "cat", "dog"]
    assert sum(x["probability"] for x in results) == pytest.approx(1.0, abs=1e-4)


def test_zero_shot_accepts_one_label_with_probability_one(client):
    r = client.post(
        "/api/zeroshot", files={"file": ("q.png", png_bytes(), "image/png")}, data={"labels": "dog"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["results"] == [{"label": "dog", "probability": 1.0}]


def _server_probabilities(client, labels: list[str], image: bytes) -> dict[str, float]:
    files = {"file": ("q.png", image, "image/png")}
    r = client.post("/api/zeroshot", files=files, data={"labels": ", ".join(labels)})
    assert r.status_code == 200, r.text
    return {x["label"]: x["probability"] for x in r.json()["results"]}


def test_zero_shot_uses_the_classifier_templates_by_default_and_the_files_when_given(client, tmp_path):
    from fastapi.testclient import TestClient

    from clipcraft.evaluation.zeroshot import ZeroShotClassifier
    from clipcraft.server.app import create_app
    from clipcraft.templates import load_templates

    index = client.app.state.index
    labels, data = ["dog", "cat", "car"], png_bytes((30, 120, 200))
    image = Image.open(io.BytesIO(data)).convert("RGB")

    def library(templates):
        _, probs = ZeroShotClassifier(index.model, labels, templates).predict([image], batch_size=1)
        return dict(zip(labels, probs[0].tolist(), strict=True))

    default = _server_probabilities(client, labels, data)
    assert default == pytest.approx(library(None), abs=2e-6)

    (tmp_path / "prompts.txt").write_text("# two of our own\nthe {} again\nnothing but {}\n")
    templates = load_templates(tmp_path / "prompts.txt")
    with TestClient(create_app(index, templates=templates)) as other:
        from_file = _server_probabilities(other, labels, data)
    assert from_file == pytest.approx(library(templates), abs=2e-6)
    # the two prompt sets score differently, so the comparisons above could tell them apart
    assert max(abs(default[k] - from_file[k]) for k in labels) > 1e-3


def test_serve_command_reads_a_templates_file(tmp_path, monkeypatch, capsys):
    import clipcraft.server.app as server_app
    from clipcraft.cli import main

    calls = []
    monkeypatch.setattr(server_app, "serve", lambda index, **kwargs: calls.append((index, kwargs)))
    (tmp_path / "prompts.txt").write_text("a sketch of a {}.\n")
    assert main(["serve", "some.index", "--templates", str(tmp_path / "prompts.txt")]) == 0
    assert main(["serve", "some.index"]) == 0
    assert [c[1]["templates"] for c in calls] == [["a sketch of a {}."], None]
    (tmp_path / "bad.txt").write_text("no slot here\n")
    assert main(["serve", "some.index", "--templates", str(tmp_path / "bad.txt")]) == 2
    assert "bad.txt:1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "url",
    [
        "/api/images/../../secret.txt",
        "/api/images/..%2F..%2Fsecret.txt",
        "/api/images/%2Fetc%2Fpasswd",
        "/api/images/-1",
        "/api/images/6",
        "/api/images/99999999999999999999999",
        "/api/images/1e3",
        "/../secret.txt",
        "/static/../../secret.txt",
    ],
)
def test_path_traversal_never_reaches_the_file_system(client, url):
    r = client.get(url)
    assert 400 <= r.status_code < 500
    assert "do not serve me" not in r.text


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"q": "dog", "k": 0}, "k must be between"),
        ({"q": "dog", "k": 51}, "k must be between"),
        ({"q": "dog", "k": 10**30}, "k"),
        ({"q": "dog", "k": "ten"}, "k"),
        ({"q": "", "k": 3}, "empty"),
        ({"q": "   ", "k": 3}, "empty"),
        ({"q": "x" * 501}, "longer than"),
        ({"k": 3}, "q"),
    ],
)
def test_bad_text_queries_get_a_4xx_with_a_message(client, params, fragment):
    r = client.get("/api/search/text", params=params)
    assert 400 <= r.status_code < 500, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and fragment in detail


@pytest.mark.parametrize(
    ("files", "data", "status", "fragment"),
    [
        ({"file": ("x.png", b"not an image at all", "image/png")}, {}, 400, "not a readable image"),
        ({"file": ("x.txt", b"hello", "text/plain")}, {}, 415, "content type"),
        ({"file": ("x.png", png_bytes(), "application/octet-stream")}, {}, 415, "content type"),
        ({"file": ("x.png", b"", "image/png")}, {}, 400, "empty"),
        ({"file": ("x.png", b"\x89PNG" + b"0" * 300_000, "image/png")}, {}, 413, "larger than"),
        ({"file": ("x.png", png_bytes(), "image/png")}, {"k": "0"}, 422, "k must be between"),
        ({"file": ("x.png", png_bytes(), "image/png")}, {"target": "../etc"}, 422, "target"),
        ({}, {}, 422, "file"),
    ],
)
def test_bad_uploads_get_a_4xx_with_a_message(client, files, data, status, fragment):
    r = client.post("/api/search/image", files=files or None, data=data)
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"]


def test_oversized_body_is_refused_before_parsing(client):
    r = client.post(
        "/api/search/image",
        content=b"0" * 400_000,
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    assert r.status_code == 413


@pytest.mark.parametrize(
    ("labels", "fragment"),
    [
        (" , ", "at least one"),
        (",".join(f"l{i}" for i in range(40)), "at most"),
        ("dog, " + "c" * 200, "at most"),
    ],
)
def test_bad_zero_shot_labels(client, labels, fragment):
    r = client.post(
        "/api/zeroshot", files={"file": ("q.png", png_bytes(), "image/png")}, data={"labels": labels}
    )
    assert r.status_code == 422 and fragment in r.json()["detail"]


def test_a_decompression_bomb_is_refused(client):
    buf = io.BytesIO()
    Image.new("L", (8000, 8000)).save(buf, format="PNG")  # tiny file, 64M pixels
    r = client.post("/api/search/image", files={"file": ("bomb.png", buf.getvalue(), "image/png")})
    assert r.status_code == 413 and "pixels" in r.json()["detail"]


# -- holes found by a new user (issue 16): each test failed before its fix --------------------------------


def _call_asgi(app, method: str, path: str, headers: list[tuple[bytes, bytes]], chunks: list[bytes]):
    """Run one request through the ASGI app with the body in ``chunks`` (as a chunked upload arrives: no
    Content-Length). Returns (status, body, bytes of the request body the app pulled)."""
    import asyncio

    pulled = 0
    sent: list[dict] = []
    position = 0

    async def receive():
        nonlocal pulled, position
        if position >= len(chunks):
            return {"type": "http.disconnect"}
        body = chunks[position]
        position += 1
        pulled += len(body)
        return {"type": "http.request", "body": body, "more_body": position < len(chunks)}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body, pulled


def test_a_chunked_upload_is_counted_as_it_arrives_and_stopped_at_the_limit(client):
    """No Content-Length: the server used to read (and spool to disk) the whole body before refusing it."""
    from clipcraft.server.app import MULTIPART_OVERHEAD

    limit = client.app.state.limits.max_upload_bytes
    head = (
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
        b"Content-Type: image/png\r\n\r\n\x89PNG"
    )
    chunk = b"0" * 65536
    chunks = [head] + [chunk] * 200 + [b"\r\n--xyz--\r\n"]  # 13 MB, 65x the limit
    headers = [
        (b"content-type", b"multipart/form-data; boundary=xyz"),
        (b"transfer-encoding", b"chunked"),
        (b"host", b"127.0.0.1"),
    ]
    status, body, pulled = _call_asgi(client.app, "POST", "/api/search/image", headers, chunks)
    assert status == 413, body
    assert b"larger than" in body
    assert pulled <= limit + MULTIPART_OVERHEAD + len(chunk) + len(head)


def test_a_chunked_upload_under_the_limit_still_works(client):
    data = png_bytes((10, 200, 10))
    body = (
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + data + b"\r\n--xyz\r\n"
        b'Content-Disposition: form-data; name="k"\r\n\r\n3\r\n--xyz--\r\n'
    )
    chunks = [body[i : i + 100] for i in range(0, len(body), 100)]
    headers = [(b"content-type", b"multipart/form-data; boundary=xyz"), (b"host", b"127.0.0.1")]
    status, out, pulled = _call_asgi(client.app, "POST", "/api/search/image", headers, chunks)
    assert status == 200, out
    assert pulled == len(body)


@pytest.fixture()
def own_index(tmp_path):
    """A fresh two-image index this test may tamper with, and a secret file outside its folder."""
    from fastapi.testclient import TestClient

    from clipcraft.search.index import build_index
    from clipcraft.server.app import create_app

    model = tmp_path / "model"
    import torch

    from clipcraft import create_model

    torch.manual_seed(0)
    create_model("tiny").save(model)
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png_bytes((200, 30, 30)))
    (images / "b.jpg").write_bytes(png_bytes((30, 30, 200)))  # a PNG named .jpg
    (tmp_path / "secret.txt").write_text("do not serve me")
    build_index(model, images, tmp_path / "index", workers=0)
    with TestClient(create_app(tmp_path / "index"), raise_server_exceptions=False) as c:
        yield c, images, tmp_path / "secret.txt"


def _row(client, name: str) -> int:
    return [e.path for e in client.app.state.index.files].index(name)


def test_a_file_swapped_for_a_symlink_after_indexing_is_refused(own_index):
    client, images, secret = own_index
    row = _row(client, "a.png")
    assert client.get(f"/api/images/{row}").status_code == 200
    (images / "a.png").unlink()
    (images / "a.png").symlink_to(secret)
    r = client.get(f"/api/images/{row}")
    assert r.status_code in (403, 404, 410), r.status_code
    assert "do not serve me" not in r.text
    assert "rebuild" in r.json()["detail"]


def test_a_file_changed_after_indexing_is_refused(own_index):
    client, images, _ = own_index
    row = _row(client, "a.png")
    (images / "a.png").write_bytes(png_bytes((1, 2, 3), size=(50, 50)))
    r = client.get(f"/api/images/{row}")
    assert r.status_code == 410 and "changed since" in r.json()["detail"]


def test_a_folder_in_place_of_a_file_is_refused(own_index):
    client, images, _ = own_index
    row = _row(client, "a.png")
    (images / "a.png").unlink()
    (images / "a.png").mkdir()
    r = client.get(f"/api/images/{row}")
    assert 400 <= r.status_code < 500


def test_images_are_served_with_the_content_type_of_their_bytes(own_index):
    client, _, _ = own_index
    r = client.get(f"/api/images/{_row(client, 'b.jpg')}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers.get("x-content-type-options") == "nosniff"


def test_docs_work_offline(client):
    """/docs used to load Swagger UI from a CDN (a blank page offline): every asset must come from us."""
    import re

    page = client.get("/docs")
    assert page.status_code == 200
    assets = re.findall(r'(?:src|href)=["\']([^"\']+)["\']', page.text)
    assets += re.findall(r"url: *['\"]([^'\"]+)['\"]", page.text)
    assert assets, page.text
    for url in assets:
        assert not url.startswith(("http:", "https:", "//")), url
        assert client.get(url).status_code == 200, url
    assert client.get("/redoc").status_code == 404  # ReDoc only comes from a CDN: not offered


# -- the page's API: thumbnails, more like this, near-duplicates, zero-shot on a result, captions --------------


def _exif_rotated_jpeg() -> bytes:
    """A 600x300 (landscape) JPEG whose EXIF says 'rotate 90°': shown upright it is 300x600 (portrait)."""
    img = Image.new("RGB", (600, 300), (250, 200, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    """An index with an EXIF-rotated photo, an exact duplicate of another image, and a caption CSV that
    names each caption's image."""
    import torch
    from fastapi.testclient import TestClient

    from clipcraft import create_model
    from clipcraft.search.index import build_index
    from clipcraft.server.app import create_app

    root = tmp_path_factory.mktemp("rich")
    torch.manual_seed(0)
    create_model("tiny").save(root / "model")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(5):
        (images / f"p{i}.png").write_bytes(
            png_bytes(tuple(int(c) for c in rng.integers(0, 255, 3)), (64, 48))
        )
    (images / "sub" / "copy-of-p0.png").write_bytes((images / "p0.png").read_bytes())
    (images / "rotated.jpg").write_bytes(_exif_rotated_jpeg())
    (root / "captions.csv").write_text(
        'image,caption\np0.png,a red square\np0.png,"red, square and flat"\nrotated.jpg,a yellow bar\n'
    )
    build_index(root / "model", images, root / "index", captions=root / "captions.csv", workers=0)
    app = create_app(root / "index", thumb_dir=root / "thumbs")
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c, root


def test_thumbnails_are_resized_exif_rotated_and_cached(rich, monkeypatch):
    import clipcraft.server.thumbs as thumbs

    client, root = rich
    row = _row(client, "rotated.jpg")
    r = client.get(f"/api/thumbs/{row}", params={"size": 256})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).size == (128, 256)  # upright, longest side 256
    preview = client.get(f"/api/thumbs/{row}", params={"size": 1024})
    assert Image.open(io.BytesIO(preview.content)).size == (300, 600)  # never upscaled
    small = Image.open(io.BytesIO(client.get(f"/api/thumbs/{_row(client, 'p1.png')}?size=256").content))
    assert small.size == (48, 64)
    cached = list((root / "thumbs").rglob("*.jpg"))
    assert len(cached) == 3

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cached thumbnail was decoded again")

    monkeypatch.setattr(thumbs, "decode_image", no_decoding)
    again = client.get(f"/api/thumbs/{row}?size=256")
    assert again.status_code == 200 and again.content == r.content


def test_thumbnail_sizes_and_ids_are_checked(rich):
    client, _ = rich
    assert client.get("/api/thumbs/0?size=100000").status_code == 422
    assert client.get("/api/thumbs/999").status_code == 404
    assert client.get("/api/thumbs/-1").status_code == 404


def test_a_thumbnail_of_a_swapped_or_changed_file_is_refused(own_index, tmp_path):
    client, images, secret = own_index
    row = _row(client, "a.png")
    assert client.get(f"/api/thumbs/{row}").status_code == 200
    (images / "a.png").write_bytes(png_bytes((9, 9, 9), size=(30, 30)))  # cached thumbnail is stale now
    assert client.get(f"/api/thumbs/{row}").status_code == 410
    (images / "a.png").unlink()
    (images / "a.png").symlink_to(secret)
    r = client.get(f"/api/thumbs/{row}")
    assert r.status_code == 403 and "do not serve me" not in r.text


def test_results_carry_thumbnails_and_each_images_own_captions(rich):
    client, _ = rich
    body = client.get("/api/search/text", params={"q": "a red square", "k": 7}).json()
    by_name = {r["name"]: r for r in body["results"]}
    assert by_name["p0.png"]["captions"] == ["a red square", "red, square and flat"]
    assert by_name["rotated.jpg"]["captions"] == ["a yellow bar"]
    assert by_name["p1.png"]["captions"] == []
    assert all(client.get(r["thumb"]).status_code == 200 for r in body["results"])
    assert client.get("/api/info").json()["images_with_captions"] == 2


def test_more_like_this_puts_the_image_and_its_duplicate_first(rich):
    client, _ = rich
    row = _row(client, "p0.png")
    body = client.get("/api/search/similar", params={"id": row, "k": 3}).json()
    assert body["query"] == {"id": row, "name": "p0.png"}
    top = [r["name"] for r in body["results"][:2]]
    assert sorted(top) == ["p0.png", "sub/copy-of-p0.png"]
    assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert client.get("/api/search/similar", params={"id": 99}).status_code == 404


def test_near_duplicates_are_dropped_on_request(rich):
    client, _ = rich
    row = _row(client, "p0.png")
    plain = client.get("/api/search/similar", params={"id": row, "k": 7}).json()
    dedup = client.get("/api/search/similar", params={"id": row, "k": 7, "dedup": 0.999}).json()
    names = [r["name"] for r in dedup["results"]]
    assert len(plain["results"]) == 7 and len(names) == 6 and dedup["dropped"] == 1
    assert ("p0.png" in names) != ("sub/copy-of-p0.png" in names)
    assert [r["rank"] for r in dedup["results"]] == list(range(1, 7))
    text = client.get("/api/search/text", params={"q": "red", "k": 7, "dedup": 0.999}).json()
    assert len(text["results"]) == 6 and text["dropped"] == 1
    for bad in (0, -0.5, 1.5):
        r = client.get("/api/search/text", params={"q": "red", "dedup": bad})
        assert r.status_code == 422 and "dedup" in r.json()["detail"]


def test_zero_shot_on_an_indexed_image_matches_the_classifier_on_the_file(rich):
    from clipcraft.evaluation.zeroshot import ZeroShotClassifier

    client, root = rich
    index = client.app.state.index
    row = _row(client, "p2.png")
    labels = ["red", "green", "blue"]
    r = client.get(f"/api/images/{row}/zeroshot", params={"labels": "red, green, blue"})
    assert r.status_code == 200, r.text
    got = {x["label"]: x["probability"] for x in r.json()["results"]}
    _, probs = ZeroShotClassifier(index.model, labels).predict(
        [str(root / "images" / "p2.png")], batch_size=1
    )
    assert got == pytest.approx(dict(zip(labels, probs[0].tolist(), strict=True)), abs=2e-6)
    assert client.get(f"/api/images/{row}/zeroshot", params={"labels": " , "}).status_code == 422
    assert client.get("/api/images/99/zeroshot", params={"labels": "a"}).status_code == 404


def test_docs_without_the_swagger_package_list_the_routes_and_link_the_schema(client, monkeypatch):
    import sys

    from fastapi.testclient import TestClient

    from clipcraft.server.app import create_app

    monkeypatch.setitem(sys.modules, "swagger_ui_bundle", None)  # as if it were not installed
    with TestClient(create_app(client.app.state.index)) as other:
        page = other.get("/docs").text
    assert 'href="/openapi.json"' in page and "/api/search/text" in page
    assert "http://" not in page and "https://" not in page
