"""Per-key limits: requests and tokens per minute (429 with `Retry-After`), and a model allow-list.

Configured per client key (`[[gateway.client_keys]]`) or for every key (`gateway.requests_per_minute`,
`gateway.tokens_per_minute`); docs/reliability.md. Windows slide over the last 60 seconds, so a
client that was refused learns in `Retry-After` exactly when its oldest counted request or tokens
leave the window. Tokens are charged when a request finishes (prompt plus completion, from the
neuron's usage): a request that would cross the token budget is still served, the next one waits.

The pipeline says which key a request came with (`use_key`); the relay asks `check_model` once the
model is resolved; accounting calls `charge` with the request's tokens.
"""

from __future__ import annotations

import contextvars
import math
import time
from collections import deque
from dataclasses import dataclass, field

from cortex.core.errors import ApiError

WINDOW_S = 60.0


@dataclass(frozen=True)
class KeyPolicy:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    models: frozenset[str] | None = None  # None: every model


@dataclass
class _Usage:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    token_sum: int = 0

    def expire(self, now: float) -> None:
        while self.requests and now - self.requests[0] >= WINDOW_S:
            self.requests.popleft()
        while self.tokens and now - self.tokens[0][0] >= WINDOW_S:
            self.token_sum -= self.tokens.popleft()[1]


_current: contextvars.ContextVar[tuple[Limiter, bytes] | None] = contextvars.ContextVar("client_key", default=None)


class Limiter:
    def __init__(self, policies: dict[bytes, KeyPolicy], default: KeyPolicy) -> None:
        self.policies = policies  # by key digest
        self.default = default
        self._usage: dict[bytes, _Usage] = {}

    def policy(self, key: bytes) -> KeyPolicy:
        return self.policies.get(key, self.default)

    def use_key(self, key: bytes) -> None:
        """Count a request of `key` now (429 over its limits) and remember the key for this request."""
        policy = self.policy(key)
        _current.set((self, key))
        if policy.requests_per_minute is None and policy.tokens_per_minute is None:
            return
        now = time.monotonic()
        usage = self._usage.setdefault(key, _Usage())
        usage.expire(now)
        if policy.requests_per_minute is not None and len(usage.requests) >= policy.requests_per_minute:
            wait = WINDOW_S - (now - usage.requests[0])
            raise _limited(f"{policy.requests_per_minute} requests per minute", wait)
        if policy.tokens_per_minute is not None and usage.token_sum >= policy.tokens_per_minute:
            wait = WINDOW_S - (now - usage.tokens[0][0])
            raise _limited(f"{policy.tokens_per_minute} tokens per minute", wait)
        usage.requests.append(now)

    def charge(self, tokens: int) -> None:
        """Add a finished request's tokens to its key's window (no-op outside a keyed request)."""
        current = _current.get()
        if current is None or current[0] is not self or tokens <= 0:
            return
        key = current[1]
        if self.policy(key).tokens_per_minute is None:
            return
        usage = self._usage.setdefault(key, _Usage())
        usage.tokens.append((time.monotonic(), tokens))
        usage.token_sum += tokens


def check_model(model_id: str) -> None:
    """403 when the request's key may not use `model_id` (no-op without a key or an allow-list)."""
    current = _current.get()
    if current is None:
        return
    allowed = current[0].policy(current[1]).models
    if allowed is not None and model_id not in allowed:
        raise ApiError(
            403,
            f"this API key may not use the model '{model_id}'",
            type="permission_error",
            param="model",
            code="model_not_allowed",
        )


def _limited(what: str, wait_s: float) -> ApiError:
    return ApiError(
        429,
        f"rate limit reached for this API key: {what}; retry after {math.ceil(max(wait_s, 1))} s",
        type="rate_limit_error",
        code="rate_limit_exceeded",
        retry_after=max(1.0, math.ceil(wait_s)),
    )
