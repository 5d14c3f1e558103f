"""The API's errors: every one answers `{"error": {"code", "message", "details"?}}` with its HTTP status."""

from __future__ import annotations


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
