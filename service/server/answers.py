"""An answered /detect request, as everything after the answer sees it (sinks, samples, feedback).

Built once per request on the event loop from objects the request already holds (no copies of
image bytes or results), then shared read-only by the worker threads; anything costly (JSON,
mask decoding, file writes) happens in those threads.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from typing import Any, Protocol

# Result fields that carry images: kept out of sink messages and sample sidecars
IMAGE_FIELDS = frozenset({"mask", "heatmap_png", "overlay_png"})


def new_answer_id() -> str:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits.

    The server's name for one answer. Unlike the caller's X-Request-ID (a correlation id that a
    gateway may reuse, e.g. its cycle number), it never collides: two answers in the same
    millisecond differ in 74 random bits, across processes and replicas alike, with no
    coordination. Time-ordered, so sample file names and database rows sort by when.
    """
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")  # 80 bits, 74 used
    value = ((ms & (2**48 - 1)) << 80) | (0x7 << 76) | (((rand >> 62) & 0xFFF) << 64) \
        | (0b10 << 62) | (rand & (2**62 - 1))
    return str(uuid.UUID(int=value))


class UploadLike(Protocol):
    filename: str
    data: bytes


@dataclass(frozen=True)
class Answer:
    request_id: str
    model: dict[str, str]
    files: tuple[tuple[str, bytes], ...]  # (filename, original bytes) in upload order
    results: tuple[dict[str, Any], ...]
    echo: dict[str, str]
    inspected_at: float = field(default_factory=time.time)  # wall clock, seconds
    answer_id: str = field(default_factory=new_answer_id)  # the server's id (request_id: the caller's)

    @classmethod
    def of(cls, request_id: str, model: dict[str, str], uploads: Sequence[UploadLike],
           results: Sequence[dict[str, Any]], echo: dict[str, str], answer_id: str | None = None) -> "Answer":
        files = tuple((u.filename, u.data) for u in uploads)
        if answer_id is None:
            return cls(request_id, model, files, tuple(results), dict(echo))
        return cls(request_id, model, files, tuple(results), dict(echo), answer_id=answer_id)

    @property
    def product(self) -> str | None:
        return self.echo.get("product")

    @property
    def nbytes(self) -> int:
        return sum(len(data) for _, data in self.files)


def dedupe_key(answer_id: str, index: int) -> str:
    """The at-least-once key of one image's result: receivers drop a key they have seen. Built on
    the server's answer id: two parts sent under one X-Request-ID are two keys."""
    return f"{answer_id}:{index}"


def public_result(result: dict[str, Any]) -> dict[str, Any]:
    """The /detect result without masks and images (what sinks publish, what sidecars keep)."""
    return {k: v for k, v in result.items() if k not in IMAGE_FIELDS}


def iso_utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ResultMessage:
    """One image's result for the sinks; the JSON body is made once, in whichever worker asks first."""

    __slots__ = ("answer", "index", "__dict__")

    def __init__(self, answer: Answer, index: int):
        self.answer = answer
        self.index = index

    @property
    def key(self) -> str:
        return dedupe_key(self.answer.answer_id, self.index)

    @property
    def result(self) -> dict[str, Any]:
        return self.answer.results[self.index]

    def document(self) -> dict[str, Any]:
        a = self.answer
        return {"id": self.key, "answer_id": a.answer_id, "request_id": a.request_id, "index": self.index,
                "model": a.model,
                "inspected_at": iso_utc(a.inspected_at), "result": public_result(self.result)}

    @cached_property
    def body(self) -> bytes:
        return json.dumps(self.document(), separators=(",", ":")).encode("utf-8")
