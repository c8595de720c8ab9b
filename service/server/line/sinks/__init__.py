"""Result sinks: where each answer goes besides the HTTP caller (MQTT broker, webhook).

`outbox` holds the bounded queue and worker every sink shares; `mqtt` and `webhook` are the
transports (the `sinks` extra: paho-mqtt, urllib3), imported only when configured.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import SecretStr


def secret_from(value: SecretStr | None, file: Path | None) -> str | None:
    """A credential given in settings or, when its file is set (which wins), read from that file."""
    if file is not None:
        return Path(file).read_text(encoding="utf-8").strip()
    return value.get_secret_value() if value is not None else None
