"""Credentials in configuration: where they come from, how they are stored, how they are compared.

A credential value in `cortex.toml` or `neuron.toml` (an API key, the admin key, a neuron token) is
one of:

- `env:NAME`: the value of environment variable NAME (read when the config is loaded; NAME must not start
  with `CORTEX_` or `NEURON_`, which the daemons read as config overrides, e.g. `FLEET_TOKEN`);
- `file:PATH`: the first line of a file (a secrets mount; `~` expanded);
- `sha256:<64 hex digits>`: only the key's SHA-256 digest, for a key the server must *check* but
  never *send* (client keys, the admin key, a neuron's own token): the config then holds nothing an
  attacker who reads it could present;
- anything else: the value itself.

`KeySet` holds digests only and checks a presented key against every one of them in constant time,
so neither a key's content nor its position in the list shows in the answer time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from collections.abc import Iterable
from pathlib import Path

_DIGEST = re.compile(r"^sha256:[0-9a-fA-F]{64}$")


def resolve_secret(value: str) -> str:
    """The credential a config value names (`env:`/`file:` read now); ValueError says what is missing."""
    if value.startswith("env:"):
        name = value[4:]
        found = os.environ.get(name, "").strip()
        if not found:
            raise ValueError(f"environment variable {name} (named by '{value}') is not set or empty")
        return found
    if value.startswith("file:"):
        path = Path(value[5:]).expanduser()
        try:
            first = path.read_text().strip().splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read {path} (named by '{value}'): {exc.strerror or exc}") from None
        if not first or not first[0].strip():
            raise ValueError(f"{path} (named by '{value}') is empty")
        return first[0].strip()
    if value.startswith("sha256:") and not _DIGEST.match(value):
        raise ValueError("a hashed key is 'sha256:' followed by 64 hex digits (sha256sum of the key)")
    if not value.strip():
        raise ValueError("a key must not be empty")
    return value


def read_key_file(path: Path) -> list[str]:
    """Keys from a file, one per line (plain or `sha256:`), blank lines and `#` comments skipped."""
    try:
        lines = path.expanduser().read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    for key in keys:
        if key.startswith("sha256:") and not _DIGEST.match(key):
            raise ValueError(f"{path}: '{key[:20]}…' is not 'sha256:' followed by 64 hex digits")
    return keys


def digest(key: str) -> bytes:
    """The SHA-256 digest a `KeySet` stores for a key given plainly or as `sha256:<hex>`."""
    if _DIGEST.match(key):
        return bytes.fromhex(key[7:])
    return hashlib.sha256(key.encode()).digest()


class KeySet:
    """Digests of the accepted keys; `matches` compares against all of them, in constant time each."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [digest(k) for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def matches(self, presented: str) -> bool:
        return self.match(presented) is not None

    def match(self, presented: str) -> bytes | None:
        """The digest of the key presented when it is one of these (its identity for limits), else None."""
        if not presented:
            return None
        given = hashlib.sha256(presented.encode(errors="surrogateescape")).digest()
        found = None
        for known in self._digests:  # no early exit: every key is compared
            if hmac.compare_digest(given, known):
                found = known
        return found

    def overlaps(self, other: KeySet) -> bool:
        return any(d in other._digests for d in self._digests)


def is_loopback(host: str) -> bool:
    """Whether a listen host accepts connections from this machine only (127.0.0.0/8, ::1, localhost)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname may resolve to anything: treat it as reachable from the network
