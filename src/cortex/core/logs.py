"""Structured logs: one line per event, `key=value` pairs, the request id on every line.

`log_event(logger, "request.done", model=..., tokens=...)` writes
`ts=… level=info event=request.done request_id=… model=… tokens=…`. The request id comes from a
context variable set once per request, so nested code never has to pass it along.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import sys
import time
from typing import Any

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID = 128
_SAFE_REQUEST_ID = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_REQUEST_ID}}}").fullmatch


def request_id_from(given: str | None) -> str:
    """The caller's request id when it is safe to log and echo (letters, digits, `.`, `_`, `-`, at
    most 128), else a new one; set for every log line of this request either way."""
    rid = given if given and _SAFE_REQUEST_ID(given) else os.urandom(8).hex()
    request_id_var.set(rid)
    return rid


def _format_value(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        fields: dict[str, Any] = getattr(record, "fields", None) or {}
        event = fields.pop("event", None) or record.getMessage()
        parts = [
            f"ts={ts}",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"event={_format_value(event)}",
        ]
        parts.append(f"request_id={request_id_var.get()}")
        parts.extend(f"{key}={_format_value(value)}" for key, value in fields.items())
        if record.exc_info:
            parts.append(f"exc={_format_value(self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log repeats what our request events already say.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"fields": {"event": event, **fields}})
