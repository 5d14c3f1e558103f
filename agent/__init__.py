"""The gateway agent: configuration, the ingest pipeline, the SQLite store, the scheduler, the status API, the CLI."""

__version__ = "0.1.0"
