"""The FastAPI app: the search page (static files shipped in the package) and a JSON API over a search index.

Safety rules: files are served only by their row number in the index (no part of a request becomes a file
system path), and only while they are still the indexed files (:mod:`clipcraft.server.files`); every input
is checked against :class:`~clipcraft.server.limits.Limits`, request bodies included, as they arrive; every
error is a 4xx JSON ``{"detail": "message"}`` (unexpected failures are a 500 with a generic message, never a
stack trace). Nothing is loaded from another site: the page and the API docs work offline. The model is loaded
once, when the app is created.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image

from clipcraft.errors import ClipcraftError
from clipcraft.images import TOO_LARGE, BadImageError, decode_image
from clipcraft.search.duplicates import drop_near_duplicates
from clipcraft.search.index import Index
from clipcraft.server.files import Refused, open_indexed
from clipcraft.server.limits import MULTIPART_OVERHEAD, BodyLimit, Limits
from clipcraft.server.page import STATIC_DIR, api_docs_fallback, page_html
from clipcraft.server.thumbs import ThumbnailCache, default_cache_dir
from clipcraft.templates import DEFAULT_TEMPLATES, check_templates

__all__ = ["MULTIPART_OVERHEAD", "create_app", "serve"]

log = logging.getLogger("clipcraft.server")

CLASSIFIERS_KEPT = 16  # zero-shot classifiers (one per label set) kept between requests


def _bad(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def _read_upload(upload: UploadFile, limits: Limits) -> Image.Image:
    """Check an uploaded file's type and size and decode it to an RGB image, or raise a 4xx."""
    ctype = (upload.content_type or "").split(";")[0].strip().lower()
    if ctype not in limits.upload_types:
        raise _bad(
            415, f"Upload an image ({', '.join(limits.upload_types)}); got content type {ctype or 'none'}."
        )
    data = upload.file.read(limits.max_upload_bytes + 1)
    if len(data) > limits.max_upload_bytes:
        raise _bad(413, f"The image is larger than {limits.max_upload_bytes // (1024 * 1024)} MiB.")
    if not data:
        raise _bad(400, "The uploaded file is empty.")
    try:
        return decode_image(data, "upload", max_pixels=limits.max_upload_pixels)
    except BadImageError as exc:
        if exc.kind == TOO_LARGE:
            raise _bad(413, f"The image has more than {limits.max_upload_pixels:,} pixels.") from None
        raise _bad(400, "The uploaded file is not a readable image.") from None
    except Exception:  # a hostile file can make a decoder fail in other ways: still "not readable"
        raise _bad(400, "The uploaded file is not a readable image.") from None


def _check_k(k: int, limits: Limits) -> int:
    if not 1 <= k <= limits.max_k:
        raise _bad(422, f"k must be between 1 and {limits.max_k}; got {k}.")
    return k


def _check_dedup(dedup: float | None) -> float | None:
    if dedup is not None and not 0.0 < dedup <= 1.0:
        raise _bad(422, f"dedup is a cosine similarity threshold in (0, 1]; got {dedup}.")
    return dedup


def _labels(labels: str, limits: Limits) -> list[str]:
    names = list(dict.fromkeys(x.strip() for x in labels.split(",") if x.strip()))
    if not names:
        raise _bad(422, "Give at least one label, comma-separated.")
    if len(names) > limits.max_labels:
        raise _bad(422, f"Give at most {limits.max_labels} labels.")
    if any(len(n) > limits.max_label_chars for n in names):
        raise _bad(422, f"Each label must be at most {limits.max_label_chars} characters.")
    return names


def create_app(
    index: Index | str | os.PathLike[str],
    model: Any = None,
    limits: Limits | None = None,
    templates: Sequence[str] | None = None,
    thumb_dir: str | os.PathLike[str] | None = None,
) -> FastAPI:
    """The app for ``index`` (an :class:`Index` or its directory); ``model`` as for :meth:`Index.load`.

    The query model is loaded here, once; model calls are serialised (one at a time) so concurrent requests
    do not oversubscribe the CPU. Zero-shot prompts are ``templates`` (each with ``{}``), by default the
    built-in set that ``clipcraft classify`` and ``clipcraft eval zeroshot`` use. Thumbnails are cached in
    ``thumb_dir`` (default: ``.<index name>.thumbs/`` beside the index).
    """
    limits = limits or Limits()
    templates = check_templates(DEFAULT_TEMPLATES if templates is None else templates)
    idx = index if isinstance(index, Index) else Index.load(index, model=model)
    if model is not None and isinstance(index, Index):
        idx.set_model(model)
    net = idx.model  # load now, not on the first request
    lock = threading.Lock()
    thumbs = ThumbnailCache(
        idx, thumb_dir if thumb_dir is not None else default_cache_dir(idx.path), limits.max_upload_pixels
    )
    classifiers: OrderedDict[tuple[str, ...], Any] = OrderedDict()
    app = FastAPI(
        title="clipcraft search",
        description="Search an image collection by text or by image, and classify images zero-shot.",
        version="1",
        docs_url=None,  # FastAPI's own pages load Swagger UI and ReDoc from a CDN: ours are served locally
        redoc_url=None,
    )
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.state.index = idx
    app.state.limits = limits
    app.state.templates = templates
    app.state.thumbs = thumbs
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _add_docs(app)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "body", "path"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
        return JSONResponse({"detail": "; ".join(parts) or "Invalid request."}, status_code=422)

    @app.exception_handler(ClipcraftError)
    async def clipcraft_error(_request: Request, exc: ClipcraftError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(Refused)
    async def refused(_request: Request, exc: Refused) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=exc)
        return JSONResponse({"detail": "Internal error; see the server log."}, status_code=500)

    def check_id(image_id: int) -> int:
        if not 0 <= image_id < len(idx):
            raise _bad(404, f"No image {image_id} in the index (it holds {len(idx)}).")
        return image_id

    def row(rank: int, score: float, i: int) -> dict[str, Any]:
        e = idx.files[i]
        version = f"{e.size:x}-{e.mtime_ns:x}"  # a changed file gets new thumbnail URLs
        return {
            "rank": rank,
            "score": round(float(score), 6),
            "id": i,
            "name": e.path,
            "url": f"/api/images/{i}",
            "thumb": f"/api/thumbs/{i}?size={limits.thumb_sizes[0]}&v={version}",
            "preview": f"/api/thumbs/{i}?size={limits.thumb_sizes[-1]}&v={version}",
            "captions": idx.captions_of(i),
        }

    def ranked(query: np.ndarray, k: int, dedup: float | None) -> dict[str, Any]:
        """The k best images for the (1, D) query, near-duplicates dropped when ``dedup`` is set."""
        if dedup is None:
            scores, ids = idx.search_vectors(query, k)
            hits = [(float(s), int(i)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]
            dropped = 0
        else:
            fetch = min(max(4 * k, k + 50), limits.max_fetch_for_dedup)
            scores, ids = idx.search_vectors(query, fetch)
            positions, kept = drop_near_duplicates(ids[0], idx.embeddings, dedup, k)
            hits = [(float(scores[0][p]), int(i)) for p, i in zip(positions, kept, strict=True)]
            examined = int(positions[-1]) + 1 if len(kept) == k else int((ids[0] >= 0).sum())
            dropped = examined - len(hits)
        rows = [row(rank, s, i) for rank, (s, i) in enumerate(hits, start=1)]
        return {"k": k, "dedup": dedup, "dropped": dropped, "results": rows}

    def classify(names: list[str], image: Image.Image | None = None, row_id: int | None = None) -> list[dict]:
        from clipcraft.evaluation.zeroshot import ZeroShotClassifier

        with lock:
            key = tuple(names)
            classifier = classifiers.pop(key, None) or ZeroShotClassifier(
                net, names, templates, batch_size=64, precision=idx.precision
            )
            classifiers[key] = classifier  # most recently used last
            while len(classifiers) > CLASSIFIERS_KEPT:
                classifiers.popitem(last=False)
            if image is not None:
                _, probs = classifier.predict([image], batch_size=1)
            else:  # an indexed image: its embedding is in the index, in the index's precision
                _, probs = classifier.predict_embeddings(idx.embeddings[row_id : row_id + 1])
        order = np.argsort(-probs[0], kind="stable")
        return [{"label": names[i], "probability": round(float(probs[0][i]), 6)} for i in order]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return page_html()

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        """Index size, captions, index kind, the request limits and the zero-shot prompt count."""
        return {
            "images": len(idx),
            "captions": len(idx.captions),
            "images_with_captions": len(idx.image_captions),
            "index": idx.manifest.get("index", {}),
            "precision": idx.precision.value,
            "templates": len(templates),
            "max_k": limits.max_k,
            "max_query_chars": limits.max_query_chars,
            "max_upload_bytes": limits.max_upload_bytes,
            "max_labels": limits.max_labels,
            "upload_types": list(limits.upload_types),
        }

    @app.get("/api/search/text")
    def search_text(
        q: Annotated[str, Query(description="text query")],
        k: Annotated[int, Query(description="number of results")] = 10,
        dedup: Annotated[
            float | None, Query(description="drop results with cosine >= this to a better one, in (0, 1]")
        ] = None,
    ) -> dict[str, Any]:
        """Text -> the k most similar images, best first: rank, score (cosine), id, name, urls, captions."""
        _check_k(k, limits)
        _check_dedup(dedup)
        text = q.strip()
        if not text:
            raise _bad(422, "The query is empty.")
        if len(text) > limits.max_query_chars:
            raise _bad(422, f"The query is longer than {limits.max_query_chars} characters.")
        with lock:
            query = idx.embed_text(text)  # (1, D), in the index's precision
        return {"query": text, **ranked(query, k, dedup)}

    @app.get("/api/search/similar")
    def search_similar(
        id: Annotated[int, Query(description="row id of an indexed image")],
        k: Annotated[int, Query(description="number of results")] = 10,
        dedup: Annotated[float | None, Query(description="near-duplicate threshold, in (0, 1]")] = None,
    ) -> dict[str, Any]:
        """More like this: the k indexed images most similar to indexed image ``id`` (itself first)."""
        _check_k(k, limits)
        _check_dedup(dedup)
        check_id(id)
        query = idx.embeddings[id : id + 1]  # (1, D): no model call
        return {"query": {"id": id, "name": idx.files[id].path}, **ranked(query, k, dedup)}

    @app.post("/api/search/image")
    def search_image(
        file: Annotated[UploadFile, File(description="query image")],
        k: Annotated[int, Form()] = 10,
        target: Annotated[str, Form(description="images or captions")] = "images",
        dedup: Annotated[float | None, Form(description="near-duplicate threshold, in (0, 1]")] = None,
    ) -> dict[str, Any]:
        """Image -> the k most similar images, or (target=captions) the k best captions."""
        _check_k(k, limits)
        _check_dedup(dedup)
        if target not in ("images", "captions"):
            raise _bad(422, f"target must be 'images' or 'captions'; got {target[:40]!r}.")
        if target == "captions" and not idx.captions:
            raise _bad(400, "This index has no captions; build it with --captions FILE.")
        image = _read_upload(file, limits)
        with lock:
            query = idx.embed_image(image)  # (1, D), in the index's precision
        if target == "captions":
            from clipcraft.search.ann import exact_search

            scores, ids = exact_search(idx.caption_embeddings, query, k)
            rows = [
                {"rank": r, "score": round(float(s), 6), "caption": idx.captions[int(i)]}
                for r, (s, i) in enumerate(zip(scores[0], ids[0], strict=True), start=1)
            ]
            return {"target": "captions", "results": rows}
        return {"target": "images", **ranked(query, k, dedup)}

    @app.post("/api/zeroshot")
    def zeroshot(
        file: Annotated[UploadFile, File(description="image to classify")],
        labels: Annotated[str, Form(description="class labels, comma-separated")],
    ) -> dict[str, Any]:
        """Image + labels -> softmax probability of each label, highest first (one label: probability 1)."""
        names = _labels(labels, limits)
        image = _read_upload(file, limits)
        return {"results": classify(names, image=image)}

    @app.get("/api/images/{image_id}/zeroshot")
    def zeroshot_indexed(
        image_id: int, labels: Annotated[str, Query(description="class labels, comma-separated")]
    ) -> dict[str, Any]:
        """Indexed image + labels -> softmax probability of each label, highest first (same prompts and
        numbers as ``clipcraft classify`` on that file)."""
        names = _labels(labels, limits)
        check_id(image_id)
        return {"id": image_id, "name": idx.files[image_id].path, "results": classify(names, row_id=image_id)}

    @app.get("/api/images/{image_id}", response_class=Response)
    def image_file(image_id: int, request: Request) -> Response:
        """The indexed image at row ``image_id``, served only while it is the file the index recorded."""
        opened = open_indexed(idx, check_id(image_id))
        etag = f'"{opened.size:x}-{opened.mtime_ns:x}"'
        headers = {
            "ETag": etag,
            "Cache-Control": "private, no-cache",  # revalidate: the same id may become another file
            "X-Content-Type-Options": "nosniff",
        }
        if request.headers.get("if-none-match") == etag:
            opened.file.close()
            return Response(status_code=304, headers=headers)
        if opened.content_type == "application/octet-stream":
            headers["Content-Disposition"] = "attachment"
        headers["Content-Length"] = str(opened.size)
        return StreamingResponse(_chunks(opened.file), media_type=opened.content_type, headers=headers)

    @app.get("/api/thumbs/{image_id}", response_class=FileResponse)
    def thumbnail(
        image_id: int,
        size: Annotated[int, Query(description="longest side in pixels")] = limits.thumb_sizes[0],
    ) -> FileResponse:
        """A JPEG thumbnail of indexed image ``image_id`` (EXIF-rotated, at most ``size`` pixels a side),
        made once and cached; refused like the image itself when the file changed."""
        if size not in limits.thumb_sizes:
            raise _bad(422, f"size must be one of {', '.join(map(str, limits.thumb_sizes))}; got {size}.")
        try:
            path = thumbs.get(check_id(image_id), size)
        except BadImageError as exc:
            raise _bad(422, f"Image {image_id} cannot be decoded: {exc.reason}.") from None
        headers = {"Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff"}
        return FileResponse(path, media_type="image/jpeg", headers=headers)

    return app


def _chunks(file: Any, size: int = 256 * 1024) -> Iterator[bytes]:
    with file:
        while chunk := file.read(size):
            yield chunk


def _add_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI from the ``swagger-ui-bundle-v2`` package's local copy; without that package, a
    plain page listing the routes and linking ``/openapi.json``. Nothing loads from a CDN."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        swagger_ui_path = None

    if swagger_ui_path is not None:
        from fastapi.openapi.docs import get_swagger_ui_html

        app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

        @app.get("/docs", include_in_schema=False)
        def docs() -> HTMLResponse:
            return get_swagger_ui_html(
                openapi_url="/openapi.json",
                title="clipcraft search API",
                swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                swagger_css_url="/docs-assets/swagger-ui.css",
                swagger_favicon_url="/docs-assets/favicon-32x32.png",
            )

    else:

        @app.get("/docs", include_in_schema=False, response_class=HTMLResponse)
        def docs_fallback() -> str:
            return api_docs_fallback(app.openapi())


def serve(
    index: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    model: Any = None,
    templates: Sequence[str] | None = None,
    thumb_dir: str | os.PathLike[str] | None = None,
) -> None:
    """Run the app with uvicorn until interrupted. Binds to localhost unless ``host`` says otherwise;
    ``templates`` and ``thumb_dir`` as for :func:`create_app`."""
    try:
        import uvicorn
    except ImportError:
        raise ClipcraftError("Serving needs uvicorn: run `pip install 'clipcraft[server]'`.") from None
    app = create_app(index, model=model, templates=templates, thumb_dir=thumb_dir)
    print(
        f"Serving {len(app.state.index)} images at http://{host}:{port}/ (API docs at /docs, "
        f"thumbnails cached in {app.state.thumbs.folder})"
    )
    uvicorn.run(app, host=host, port=port, log_level="info")
