"""The API's one error type. Every error answers web.http's envelope `{"error": {"code", "message", "details"?}}`
with its HTTP status (central/app.py's handlers)."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A request the API refuses; raised anywhere in a request, turned into a JSON error by the app."""

    def __init__(self, status: int, code: str, message: str, details: list[Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.headers = status, code, message, details, headers
