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
        ("dog", "at least two"),
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
