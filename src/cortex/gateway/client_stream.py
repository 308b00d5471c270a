"""The event stream the gateway answers a client with: started when there is something to say.

A stream's headers (`SSE_HEADERS`, the request id) go out on its first write: the first event, or
the first keep-alive while a cold load runs. `idle()` writes the stream's keep-alive frame (an SSE
comment, or a dialect's own ping event) and starts the stream first if needed.

A client that stops reading fills its socket and then a write waits; once one has waited
`gateway.client_write_timeout_s` the connection is cut (ConnectionResetError), which ends the
relay, which aborts the neuron's connection and so the generation: nothing stays pinned.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from cortex.core.logs import REQUEST_ID_HEADER, request_id_var
from cortex.core.sse import KEEPALIVE, SSE_HEADERS

WRITE_TIMEOUT: web.AppKey[float] = web.AppKey("client_write_timeout_s", float)
DEFAULT_WRITE_TIMEOUT_S = 30.0
# aiohttp drains (waits for the client) only once the transport holds more than its high-water mark, 64 KiB.
_NEVER_WAITS_BELOW = 64 * 1024


class ClientStream:
    def __init__(
        self, request: web.Request, *, opening: Callable[[], bytes] | None = None, idle_frame: bytes = KEEPALIVE
    ) -> None:
        self.request = request
        self.response = web.StreamResponse(headers={**SSE_HEADERS, REQUEST_ID_HEADER: request_id_var.get()})
        self.opening = opening  # the dialect's first events, written once right after the headers
        self.idle_frame = idle_frame
        self.last_write = 0.0

    @property
    def started(self) -> bool:
        return self.response.prepared

    async def start(self) -> None:
        if not self.response.prepared:
            await self.response.prepare(self.request)
            if self.opening is not None:
                await self.write(self.opening())

    async def write(self, data: bytes, *, last: bool = False) -> None:
        """Write `data`; `last`: and end the body in the same write (nothing can be written after it)."""
        if data or last:
            send = self.response.write_eof if last else self.response.write
            transport = self.request.transport
            if transport is not None and transport.get_write_buffer_size() + len(data) < _NEVER_WAITS_BELOW:
                # The common case: the client keeps up, the write cannot wait, so no timer is needed.
                await send(data)
                self.last_write = asyncio.get_running_loop().time()
                return
            limit = self.request.config_dict.get(WRITE_TIMEOUT, DEFAULT_WRITE_TIMEOUT_S)
            try:
                async with asyncio.timeout(limit):  # a timer, not a task per write: streams write often
                    await send(data)
            except TimeoutError:
                if self.request.transport is not None:
                    self.request.transport.abort()
                raise ConnectionResetError(f"the client read nothing for {limit:g} s") from None
            self.last_write = asyncio.get_running_loop().time()

    async def idle(self) -> None:
        """Keep the client's connection alive (starting the stream first if needed)."""
        await self.start()
        await self.write(self.idle_frame)
