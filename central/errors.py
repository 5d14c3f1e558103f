"""The API's errors: every one answers `{"error": {"code", "message", "details"?}}` with its HTTP status."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ApiError(Exception):
    """A request the API refuses; raised anywhere in a request, turned into a JSON error by the app."""

    def __init__(self, status: int, code: str, message: str, details: list | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.headers = status, code, message, details, headers


def body(code: str, message: str, details: list | None = None) -> dict:
    error: dict = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return {"error": error}


# The envelope as documented in the OpenAPI document (central/app.py puts it on every 4xx and 5xx).

class ErrorDetail(BaseModel):
    loc: list[str | int]  # where in the request: ["query", "limit"], ["summaries", 3, "window_end"]
    msg: str
    type: str


class ErrorFields(BaseModel):
    code: str  # stable, for programs: unauthorized, invalid_batch, too_many_requests, database_unavailable...
    message: str  # for people
    details: list[ErrorDetail | dict[str, Any]] | None = None  # validation problems, when there are some


class Error(BaseModel):
    error: ErrorFields
