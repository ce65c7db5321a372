"""The FastAPI app: one plain page and a JSON API over a search index.

Safety rules: files are served only by their row number in the index (no part of a request becomes a file
system path); every input is checked against :class:`~clipcraft.server.limits.Limits`; every error is a 4xx
JSON ``{"detail": "message"}`` (unexpected failures are a 500 with a generic message, never a stack trace).
The model is loaded once, when the app is created.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from PIL import Image

from clipcraft.errors import ClipcraftError
from clipcraft.images import TOO_LARGE, BadImageError, decode_image
from clipcraft.search.index import Index
from clipcraft.server.limits import Limits
from clipcraft.server.page import PAGE
from clipcraft.templates import DEFAULT_TEMPLATES, check_templates

log = logging.getLogger("clipcraft.server")

MULTIPART_OVERHEAD = 64 * 1024  # form fields and boundaries around an uploaded file


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


def create_app(
    index: Index | str | os.PathLike[str],
    model: Any = None,
    limits: Limits | None = None,
    templates: Sequence[str] | None = None,
) -> FastAPI:
    """The app for ``index`` (an :class:`Index` or its directory); ``model`` as for :meth:`Index.load`.

    The query model is loaded here, once; model calls are serialised (one at a time) so concurrent requests
    do not oversubscribe the CPU. Zero-shot prompts are ``templates`` (each with ``{}``), by default the
    built-in set that ``clipcraft classify`` and ``clipcraft eval zeroshot`` use.
    """
    limits = limits or Limits()
    templates = check_templates(DEFAULT_TEMPLATES if templates is None else templates)
    idx = index if isinstance(index, Index) else Index.load(index, model=model)
    if model is not None and isinstance(index, Index):
        idx.set_model(model)
    net = idx.model  # load now, not on the first request
    lock = threading.Lock()
    app = FastAPI(
        title="clipcraft search",
        description="Search an image collection by text or by image, and classify images zero-shot.",
        version="1",
    )
    app.state.index = idx
    app.state.limits = limits
    app.state.templates = templates

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return JSONResponse({"detail": "Invalid Content-Length header."}, status_code=400)
            if int(length) > limits.max_upload_bytes + MULTIPART_OVERHEAD:
                return JSONResponse(
                    {"detail": f"The request is larger than {limits.max_upload_bytes // (1024 * 1024)} MiB."},
                    status_code=413,
                )
        return await call_next(request)

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

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=exc)
        return JSONResponse({"detail": "Internal error; see the server log."}, status_code=500)

    def image_rows(scores: np.ndarray, ids: np.ndarray) -> list[dict[str, Any]]:
        rows = []
        for rank, (s, i) in enumerate(zip(scores, ids, strict=True), start=1):
            if i < 0:
                continue
            rows.append(
                {"rank": rank, "score": round(float(s), 6), "id": int(i), "name": idx.files[int(i)].path}
                | {"url": f"/api/images/{int(i)}"}
            )
        return rows

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        """Index size, captions, index kind and the request limits."""
        return {
            "images": len(idx),
            "captions": len(idx.captions),
            "index": idx.manifest.get("index", {}),
            "max_k": limits.max_k,
            "max_query_chars": limits.max_query_chars,
            "max_upload_bytes": limits.max_upload_bytes,
        }

    @app.get("/api/search/text")
    def search_text(
        q: Annotated[str, Query(description="text query")],
        k: Annotated[int, Query(description="number of results")] = 10,
    ) -> dict[str, Any]:
        """Text -> the k most similar images, best first: rank, score (cosine), id, name, url."""
        _check_k(k, limits)
        text = q.strip()
        if not text:
            raise _bad(422, "The query is empty.")
        if len(text) > limits.max_query_chars:
            raise _bad(422, f"The query is longer than {limits.max_query_chars} characters.")
        with lock:
            query = idx.embed_text(text)  # (1, D), in the index's precision
        scores, ids = idx.search_vectors(query, k)
        return {"query": text, "results": image_rows(scores[0], ids[0])}

    @app.post("/api/search/image")
    def search_image(
        file: Annotated[UploadFile, File(description="query image")],
        k: Annotated[int, Form()] = 10,
        target: Annotated[str, Form(description="images or captions")] = "images",
    ) -> dict[str, Any]:
        """Image -> the k most similar images, or (target=captions) the k best captions."""
        _check_k(k, limits)
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
        scores, ids = idx.search_vectors(query, k)
        return {"target": "images", "results": image_rows(scores[0], ids[0])}

    @app.post("/api/zeroshot")
    def zeroshot(
        file: Annotated[UploadFile, File(description="image to classify")],
        labels: Annotated[str, Form(description="class labels, comma-separated")],
    ) -> dict[str, Any]:
        """Image + labels -> softmax probability of each label, highest first (one label: probability 1)."""
        from clipcraft.evaluation.zeroshot import ZeroShotClassifier

        names = list(dict.fromkeys(x.strip() for x in labels.split(",") if x.strip()))
        if not names:
            raise _bad(422, "Give at least one label, comma-separated.")
        if len(names) > limits.max_labels:
            raise _bad(422, f"Give at most {limits.max_labels} labels.")
        if any(len(n) > limits.max_label_chars for n in names):
            raise _bad(422, f"Each label must be at most {limits.max_label_chars} characters.")
        image = _read_upload(file, limits)
        with lock:
            classifier = ZeroShotClassifier(net, names, templates, batch_size=64, precision=idx.precision)
            _, probs = classifier.predict([image], batch_size=1)
        order = np.argsort(-probs[0], kind="stable")
        return {"results": [{"label": names[i], "probability": round(float(probs[0][i]), 6)} for i in order]}

    @app.get("/api/images/{image_id}", response_class=FileResponse)
    def image_file(image_id: int) -> FileResponse:
        """The indexed image at row ``image_id`` (only files in the index are ever served)."""
        if not 0 <= image_id < len(idx):
            raise _bad(404, f"No image {image_id} in the index (it holds {len(idx)}).")
        path = Path(idx.path_of(image_id))
        if not path.is_file():
            raise _bad(404, f"Image {image_id} is no longer on disk; rebuild the index.")
        return FileResponse(path)

    return app


def serve(
    index: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    model: Any = None,
    templates: Sequence[str] | None = None,
) -> None:
    """Run the app with uvicorn until interrupted. Binds to localhost unless ``host`` says otherwise;
    ``templates`` as for :func:`create_app`."""
    try:
        import uvicorn
    except ImportError:
        raise ClipcraftError("Serving needs uvicorn: run `pip install 'clipcraft[server]'`.") from None
    app = create_app(index, model=model, templates=templates)
    print(f"Serving {len(app.state.index)} images at http://{host}:{port}/ (API docs at /docs)")
    uvicorn.run(app, host=host, port=port, log_level="info")
