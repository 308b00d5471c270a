"""Prefix affinity: send a conversation back to the replica that served its beginning.

A neuron keeps the KV blocks of prompts it has seen (its prefix cache); a request whose prompt
begins like one a replica served recently skips recomputing that beginning there. Requests of one
conversation or one agent share their stable prefix: the tools, the system prompt and the first
messages. `prefix_key` hashes that prefix; `Affinity` remembers, least recently used first out,
which node served each key, so the router can prefer it among the replicas of the model.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import orjson

# Keys remembered (a few MB at most); the least recently used go first.
DEFAULT_CAPACITY = 8192


def prefix_key(body: dict[str, Any]) -> bytes | None:
    """A hash of a chat body's stable prefix: tools, then messages up to and including the first user one.

    None when there is nothing worth keying (no messages, e.g. a text completion).
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    end = next((i + 1 for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"), 1)
    try:
        stable = orjson.dumps([body.get("tools"), messages[:end]])
    except TypeError:  # not JSON-serialisable: nothing we could have sent either
        return None
    return hashlib.blake2b(stable, digest_size=12).digest()


class Affinity:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._nodes: OrderedDict[tuple[str, bytes], str] = OrderedDict()

    def node_for(self, model_id: str, key: bytes) -> str | None:
        return self._nodes.get((model_id, key))

    def remember(self, model_id: str, key: bytes, node: str) -> None:
        entry = (model_id, key)
        self._nodes[entry] = node
        self._nodes.move_to_end(entry)
        if len(self._nodes) > self.capacity:
            self._nodes.popitem(last=False)
