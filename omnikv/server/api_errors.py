"""OpenAI-style error responses: `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from omnikv.errors import OmniKVError, ResourceError

# HTTP status -> OpenAI error "type".
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error answered to the client as OpenAI error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_exception(exc: BaseException) -> APIError:
    """Map an exception raised while serving a request to the error the client sees.

    User-facing `OmniKVError`s keep their message (they are written for users); anything else is an
    internal failure whose details stay in the server log, not in the response.
    """
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ResourceError):
        return APIError(503, str(exc), code="insufficient_resources")
    if isinstance(exc, OmniKVError):
        return APIError(400, str(exc), code="invalid_request")
    return APIError(500, "Internal error while generating; see the server log.", code="internal_error")
