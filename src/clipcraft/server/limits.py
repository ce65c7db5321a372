"""What the web API accepts, and the guard that holds request bodies to it. A request outside these limits
gets a 4xx with a message."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MULTIPART_OVERHEAD = 64 * 1024  # form fields and boundaries around an uploaded file


@dataclass(frozen=True)
class Limits:
    max_k: int = 100  # results per query
    max_query_chars: int = 500  # text query length
    max_upload_bytes: int = 8 * 1024 * 1024  # uploaded image file size
    max_upload_pixels: int = 40_000_000  # decoded image size (decompression bombs)
    max_labels: int = 32  # zero-shot labels per request
    max_label_chars: int = 100  # characters per zero-shot label
    upload_types: tuple[str, ...] = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp")
    thumb_sizes: tuple[int, ...] = (
        256,
        1024,
    )  # longest side of a thumbnail (grid) and a preview (large view)
    max_fetch_for_dedup: int = 1000  # candidates searched to fill k results after near-duplicates are dropped

    @property
    def max_body_bytes(self) -> int:
        """The largest request body: one upload plus its form fields."""
        return self.max_upload_bytes + MULTIPART_OVERHEAD


class BodyLimit:
    """ASGI middleware that refuses request bodies over ``max_bytes`` with a 413, without reading the rest.

    A declared ``Content-Length`` over the limit is refused before anything is read. A body without one
    (chunked transfer encoding) is counted as it arrives and refused as soon as it passes the limit, so an
    oversized upload is never read whole nor spooled to disk.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> tuple[int, str]:
        return 413, f"The request is larger than {self.max_bytes / (1024 * 1024):.1f} MiB."

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await _json(send, 400, "Invalid Content-Length header.")
                return
            if int(length) > self.max_bytes:
                await _json(send, *self._too_large())
                return
        received = 0
        exceeded = False
        started = False

        async def counted() -> Message:
            nonlocal received, exceeded
            if exceeded:  # never read past the limit, whatever the app asks
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    from fastapi import HTTPException

                    raise HTTPException(status_code=413, detail=self._too_large()[1])
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded and not started:  # whatever the app made of the cut body, the answer is 413
                started = True
                await _json(send, *self._too_large())
                return
            if exceeded:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted, guarded_send)


async def _json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
