"""The central ingest and fleet API (FastAPI on PostgreSQL): settings, db (pool and migrations), auth (tokens),
ingest, ops, app (the ASGI app), server (uvicorn and gunicorn), cli (`pdm-central`)."""

__version__ = "0.1.0"
