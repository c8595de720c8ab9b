"""Webhook result sink: each image's result POSTed as JSON, signed, retried with backoff (urllib3:
a pooled keep-alive connection; a quarter of httpx's CPU per POST, which matters for a sink that
runs beside /detect on every result).

Headers on every attempt (the body is byte-identical across retries):
- `X-Dapo-Delivery` and `Idempotency-Key`: the dedupe key `<request_id>:<index>`;
- `X-Dapo-Signature-256: sha256=<hex HMAC-SHA256 of the body>` when a secret is configured
  (the GitHub webhook convention, so receivers' existing verification code works).

2xx is delivered. 408, 425, 429, 5xx and network errors are retried (the receiver's
Retry-After is honoured, up to the backoff cap); any other status means the receiver refuses
this message for good, so it is counted as rejected instead of retried forever.
"""
from __future__ import annotations

import hashlib
import hmac
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

import urllib3

import service
from service.server.answers import ResultMessage
from service.server.line.sinks import secret_from
from service.server.line.sinks.outbox import DELIVERED, Outcome, Status

SIGNATURE_HEADER = "X-Dapo-Signature-256"
DELIVERY_HEADER = "X-Dapo-Delivery"
RETRYABLE = frozenset({408, 425, 429})


def signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class WebhookOptions:
    url: str
    secret: bytes | None = None
    timeout_s: float = 5.0

    @classmethod
    def from_settings(cls, s) -> "WebhookOptions":
        url = urlsplit(s.webhook_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"DAPO_WEBHOOK_URL must be an http(s) URL, got {s.webhook_url!r}")
        secret = secret_from(s.webhook_secret, s.webhook_secret_file)
        return cls(s.webhook_url, secret.encode("utf-8") if secret else None, s.webhook_timeout_s)


def retry_after(response: urllib3.BaseHTTPResponse) -> float | None:
    value = response.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


class WebhookTransport:
    name = "webhook"

    def __init__(self, options: WebhookOptions):
        self.options = options
        # our own backoff decides about retries; redirects are not followed (a POST must not turn into a GET)
        self.pool = urllib3.PoolManager(num_pools=1, maxsize=1, retries=False,
                                        timeout=urllib3.Timeout(total=options.timeout_s))
        self.base_headers = {"User-Agent": f"dapo-inspect/{service.__version__}", "Content-Type": "application/json"}

    def start(self) -> None:
        pass

    def headers(self, message: ResultMessage) -> dict[str, str]:
        h = {**self.base_headers, DELIVERY_HEADER: message.key, "Idempotency-Key": message.key}
        if self.options.secret is not None:
            h[SIGNATURE_HEADER] = signature(self.options.secret, message.body)
        return h

    def deliver(self, message: ResultMessage, cancel: threading.Event) -> Outcome:
        try:
            response = self.pool.request("POST", self.options.url, body=message.body, headers=self.headers(message),
                                         redirect=False)
        except urllib3.exceptions.HTTPError as e:
            return Outcome(Status.RETRY, f"{type(e).__name__}: {e}")
        code = response.status
        if 200 <= code < 300:
            return DELIVERED
        if code in RETRYABLE or code >= 500:
            return Outcome(Status.RETRY, f"HTTP {code}", retry_after(response))
        return Outcome(Status.REJECTED, f"HTTP {code}: {response.data[:200].decode('utf-8', 'replace')}")

    def close(self) -> None:
        self.pool.clear()
