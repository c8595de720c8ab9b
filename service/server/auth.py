"""API keys: who may call.

Keys come from `DAPO_API_KEYS` (comma list) and/or `DAPO_API_KEYS_FILE` (one key per line,
`#` comments). Keys are compared with hmac.compare_digest against every configured key (no
early exit, so timing does not tell which prefix matched), are never logged, and are known
elsewhere only by a short SHA-256 tag (the "principal") used to scope idempotency keys, so one
client can never receive another client's stored answer.
"""
from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

from pydantic import SecretStr


def read_keys_file(path: Path) -> list[str]:
    """Keys from a file, one per line; blank lines and `#` comments ignored."""
    keys = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(line)
    return keys


def principal_of(key: str) -> str:
    """A short, non-reversible tag for a key (safe to log, used to scope idempotency)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


class ApiKeys:
    """The configured keys; `check` answers the caller's principal or None."""

    def __init__(self, keys: Iterable[str]):
        self._keys = tuple(k.encode("utf-8") for k in dict.fromkeys(keys) if k)

    @classmethod
    def from_settings(cls, keys: list[SecretStr], keys_file: Path | None) -> "ApiKeys":
        values = [k.get_secret_value() for k in keys]
        if keys_file is not None:
            values += read_keys_file(keys_file)
        return cls(values)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, provided: str | None) -> str | None:
        """Principal of a valid key, "anonymous" when auth is off, None when refused."""
        if not self.enabled:
            return "anonymous"
        if not provided:
            return None
        candidate = provided.encode("utf-8", "surrogateescape")
        match = False
        for key in self._keys:  # no early exit
            match |= hmac.compare_digest(candidate, key)
        return principal_of(provided) if match else None
