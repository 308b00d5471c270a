"""The per-request `request.done` line, cheap enough for the hot path.

Same `key=value` format and destination as every other line (core/logs.py), but formatted with
one f-string and written once per event-loop iteration for all requests that finished in it:
going through `logging` cost a tenth of the gateway's CPU at full load. Prompts are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

from cortex.core.logs import request_id_var

LOGGER = "cortex.gateway.access"
_PLAIN = re.compile(r"[A-Za-z0-9_./:@+\[\]-]+").fullmatch
_NAME_MAX = 80  # characters of a requested model name the log keeps


def requested_name(model: Any) -> str:
    """The model a client asked for, as the log shows it when it names none this gateway serves (the metrics
    keep one `unknown` label for those): printable characters only, at most `_NAME_MAX` of them."""
    if not isinstance(model, str) or not model:
        return "-"
    name = "".join(c if c.isprintable() else "?" for c in model[:_NAME_MAX])
    return name + "..." if len(model) > _NAME_MAX else name


def _value(text: str) -> str:
    if _PLAIN(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


_LABELS: dict[str, str] = {}  # route, model, node, error: a few distinct values, each quoted once
_LABELS_MAX = 4096


def _label(text: str) -> str:
    quoted = _LABELS.get(text)
    if quoted is None:
        if len(_LABELS) >= _LABELS_MAX:
            _LABELS.clear()
        quoted = _LABELS[text] = _value(text)
    return quoted


class AccessLog:
    def __init__(self) -> None:
        self.logger = logging.getLogger(LOGGER)
        self._pending: list[str] = []
        self._second = -1
        self._stamp = ""

    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def request_done(
        self,
        route: str,
        status: int,
        model: str,
        node: str,
        stream: bool,
        seconds: float,
        prompt_tokens: int,
        completion_tokens: int,
        error: str,
    ) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        self._pending.append(
            f"ts={self._stamp}.{int((now - second) * 1000):03d}Z level=info logger={LOGGER} event=request.done "
            f"request_id={_value(request_id_var.get())} route={_label(route)} status={status} model={_label(model)} "
            f"node={_label(node)} stream={stream} ms={seconds * 1000:.2f} prompt_tokens={prompt_tokens} "
            f"completion_tokens={completion_tokens} error={_label(error)}"
        )
        if len(self._pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop (tests, shutdown): write now
                self.flush()

    def flush(self) -> None:
        lines, self._pending = self._pending, []
        if not lines:
            return
        for handler in logging.getLogger().handlers:
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and stream is not None:
                stream.write("\n".join(lines) + "\n")
                handler.flush()
                return
        for line in lines:  # logging configured some other way: let it route each line
            self.logger.info(line)
