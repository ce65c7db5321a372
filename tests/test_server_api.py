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
    assert '<form id="text-form">' in client.get("/").text
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
