"""The aiohttp application key under which the running `Gateway` lives (its own module: no import cycles)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from cortex.gateway.runtime import Gateway

GATEWAY: web.AppKey[Gateway] = web.AppKey("cortex.gateway")
