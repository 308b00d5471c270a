"""Error envelopes for both dialects, and the one exception type every layer raises.

An `ApiError` carries an HTTP status plus OpenAI-style `type`/`code`; each route renders it in
its own dialect with `openai_error_body` or `anthropic_error_body`.
"""

from __future__ import annotations

from typing import Any

# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
    529: "overloaded_error",
}

# OpenAI's error `type` by HTTP status, used when the raiser gave none.
_OPENAI_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}


class ApiError(Exception):
    """A failure the client should see: status, message, and OpenAI-style type/param/code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code
        self.retry_after = retry_after
        self.details = details or {}  # machine-readable facts, sent inside the OpenAI error object

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}

    def openai_body(self) -> dict[str, Any]:
        body = openai_error_body(self.message, self.type, self.param, self.code)
        body["error"].update(self.details)
        return body

    def anthropic_body(self) -> dict[str, Any]:
        return anthropic_error_body(self.status, self.anthropic_message())

    def anthropic_message(self) -> str:
        """Anthropic's own wording where clients act on it (Claude Code compacts on "prompt is too long")."""
        prompt, limit = self.details.get("prompt_tokens"), self.details.get("context_length")
        if self.code == "context_length_exceeded" and prompt is not None and limit is not None:
            return f"prompt is too long: {prompt} tokens > {limit} maximum"
        return self.message


def openai_error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def anthropic_error_type(status: int) -> str:
    if status in _ANTHROPIC_TYPES:
        return _ANTHROPIC_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": anthropic_error_type(status), "message": message}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, type="invalid_request_error", param=param, code=code)


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model '{model}' does not exist or is not served here",
        type="invalid_request_error",
        param="model",
        code="model_not_found",
    )
