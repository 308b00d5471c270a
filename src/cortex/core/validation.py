"""Request validation shared by every route: a pydantic model, and the client's mistake phrased as a 400."""

from __future__ import annotations

import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from cortex.core.errors import bad_request

R = TypeVar("R", bound=BaseModel)

_BRANCH_LABEL = re.compile(r"^(str|int|float|bool|dict|list|none|[A-Z]\w*)$|\[")


def _clean_location(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc if not (isinstance(part, str) and _BRANCH_LABEL.search(part)))


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """The most specific problem, phrased like Anthropic does (`messages.0.content.1.id: Field required`).

    For a union (`content: str | list[block]`) pydantic reports every branch; the deepest error is
    the one about what the client actually sent.
    """
    errors = exc.errors(include_url=False)
    deepest = max(errors, key=lambda e: len(e["loc"]))
    path = _clean_location(deepest["loc"])
    message = "Field required" if deepest["type"] == "missing" else deepest["msg"]
    return (f"{path}: {message}" if path else message), (path or None)


def parse_request(model: type[R], body: Any) -> R:
    """Validate a decoded JSON body; any problem becomes a 400 `invalid_request_error`."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise bad_request(message, param=param) from exc
