"""Structured JSON logs, one object per line, each carrying the request id in force.

Line operators ship logs to Loki/ELK; one JSON object per line with a `request_id` lets them
follow one image across the access log, batching and errors. The request id lives in a
contextvar set by the request middleware, so any module can log without passing it around.
Request headers, API keys and image bytes are never logged.
"""
from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("dapo_request_id", default=None)
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


def current_request_id() -> str | None:
    return _request_id.get()


def set_request_id(request_id: str | None) -> contextvars.Token:
    return _request_id.set(request_id)


def reset_request_id(token: contextvars.Token) -> None:
    _request_id.reset(token)


class JsonFormatter(logging.Formatter):
    """Record -> one JSON line: time, level, logger, message, request_id and any `extra=`."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or current_request_id()
        if rid:
            doc["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _RESERVED and key not in doc and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(level: str = "INFO") -> None:
    """JSON to stderr for the `dapo` and `uvicorn` loggers (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("dapo", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level)
        logger.propagate = False
    # uvicorn's own access log would duplicate ours (which has the request id and timings)
    logging.getLogger("uvicorn.access").disabled = True
