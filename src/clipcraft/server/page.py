"""The search page of ``clipcraft serve``: plain HTML, CSS and JavaScript in ``static/`` (shipped as package
data, nothing to build, nothing loaded from another site), and the fallback API docs page.

The page puts results into the document with ``textContent`` and element properties, never ``innerHTML``,
so file names and captions cannot inject markup.
"""

from __future__ import annotations

import functools
import html
from pathlib import Path
from typing import Any

STATIC_DIR = Path(__file__).resolve().parent / "static"


@functools.lru_cache(maxsize=1)
def page_html() -> str:
    """The page (``static/index.html``); its CSS and script are served from ``/static/``."""
    return (STATIC_DIR / "index.html").read_text(encoding="utf-8")


def api_docs_fallback(openapi: dict[str, Any]) -> str:
    """A plain ``/docs`` page for when the ``swagger-ui-bundle-v2`` package is missing: every route with its
    summary and parameters, and a link to the machine-readable ``/openapi.json``."""
    items = []
    for path, methods in sorted(openapi.get("paths", {}).items()):
        for method, op in methods.items():
            params = ", ".join(p["name"] for p in op.get("parameters", []))
            items.append(
                f"<li><code>{html.escape(method.upper())} {html.escape(path)}</code>"
                f"{' (' + html.escape(params) + ')' if params else ''}: "
                f"{html.escape(op.get('summary', ''))}<br><small>{html.escape(op.get('description', ''))}"
                "</small></li>"
            )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>clipcraft search API</title></head>'
        '<body><h1>clipcraft search API</h1><p>The full description is <a href="/openapi.json">/openapi.json'
        "</a> (OpenAPI 3). Install <code>swagger-ui-bundle-v2</code> for the interactive page.</p>"
        f"<ul>{''.join(items)}</ul></body></html>"
    )
