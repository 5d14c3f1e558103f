"""The central ingest and fleet API (FastAPI on PostgreSQL)."""
