"""The web page and JSON API over a search index (FastAPI + uvicorn), imported only by ``clipcraft serve``.

Build the app with :func:`clipcraft.server.app.create_app`; run it with :func:`clipcraft.server.app.serve`.
"""
