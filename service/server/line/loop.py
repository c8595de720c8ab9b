"""Closing the loop with the line: what happens after /detect has answered.

`LineLoop.after_detect` is the one call the /detect route makes: it builds an `Answer` from
what the request already holds and hands it to the parts that are configured, each of which
only queues (microseconds; the work is done by their own threads):

- result sinks (MQTT, webhook): service.server.line.sinks, one bounded outbox each;
- samples kept by policy: service.server.line.samples;
- the recent answers that operator feedback needs: service.server.line.recent / feedback
  (`remember`, awaited by the route: in Redis with DAPO_STATE_URL, so that a verdict may reach
  any replica at once).

Nothing here can fail a request: a bug in a hook is logged and the answer goes out regardless.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from service.server.answers import Answer, ResultMessage, UploadLike
from service.server.line.feedback import FeedbackDesk
from service.server.metrics import LoopMetrics
from service.server.line.recent import LocalRecent, RecentAnswers, RecentStore
from service.server.line.samples import sweep_incomplete
from service.server.line.samples import SampleKeeper
from service.server.line.samples_policy import SamplePolicy
from service.server.settings import Settings
from service.server.line.sinks.outbox import Outbox, OutboxOptions, Transport

log = logging.getLogger("dapo.loop")


def _mqtt(s: Settings) -> Transport:
    from service.server.line.sinks.mqtt import MqttOptions, MqttTransport

    return MqttTransport(MqttOptions.from_settings(s))


def _webhook(s: Settings) -> Transport:
    from service.server.line.sinks.webhook import WebhookOptions, WebhookTransport

    return WebhookTransport(WebhookOptions.from_settings(s))


def build_outboxes(settings: Settings, metrics: LoopMetrics) -> list[Outbox]:
    """One outbox per configured sink (transports imported only when configured)."""
    s = settings
    sinks = (  # (the setting that turns it on, its value, the transport, the queue bound and rate)
        ("DAPO_MQTT_URL", s.mqtt_url, _mqtt, s.mqtt_queue_size, s.mqtt_rate_per_s),
        ("DAPO_WEBHOOK_URL", s.webhook_url, _webhook, s.webhook_queue_size, s.webhook_rate_per_s),
    )
    outboxes = []
    for setting, url, make_transport, queue_size, rate_per_s in sinks:
        if not url:
            continue
        try:
            transport = make_transport(s)
        except ImportError as e:  # the `sinks` extra
            raise RuntimeError(f"{setting} is set but {e.name} is not installed: "
                               "pip install 'dapo-inspect[sinks]'") from e
        # one message in flight; the backoff is the same for every sink
        options = OutboxOptions(queue_size, rate_per_s, 1, s.sink_backoff_initial_s, s.sink_backoff_max_s)
        outboxes.append(Outbox(transport, options, metrics))
    return outboxes


def recent_store(settings: Settings, link: Any) -> RecentStore:
    """In this process, or in the fleet's shared state (DAPO_STATE_URL)."""
    max_bytes = int(settings.feedback_ring_mb * 2**20)
    if link is None:
        return LocalRecent(RecentAnswers(settings.feedback_window_s, max_bytes))
    from service.server.fleet.recent import RedisRecent

    return RedisRecent(link, settings.feedback_window_s, max_bytes)


class LineLoop:
    def __init__(self, settings: Settings, metrics: LoopMetrics, link: Any = None):
        self.settings, self.metrics, self.link = settings, metrics, link
        self.outboxes: list[Outbox] = []
        self.samples: SampleKeeper | None = None
        self.recent: RecentStore | None = None
        self.feedback: FeedbackDesk | None = None
        self._failed_once = False

    @property
    def enabled(self) -> bool:
        return bool(self.outboxes) or self.samples is not None or self.recent is not None

    def start(self) -> None:
        """Build and start what the settings configure (blocking I/O: call it off the event loop).
        A sink whose receiver is down does not stop the start: it queues until it is back."""
        s = self.settings
        if s.samples_dir is not None:
            swept = sweep_incomplete(s.samples_dir)  # what a crash left half-written
            self.metrics.samples_swept.inc(len(swept))
        self.outboxes = build_outboxes(s, self.metrics)
        policy = SamplePolicy(s.samples_policy)
        if policy.enabled:
            if s.samples_dir is None:
                raise ValueError("DAPO_SAMPLES_POLICY is set but DAPO_SAMPLES_DIR is not: where should samples go?")
            self.samples = SampleKeeper(s.samples_dir, policy, s.samples_queue_size, self.metrics)
        if s.feedback_db:
            from service.runtime.feedback_store import FeedbackStore

            self.recent = recent_store(s, self.link)
            self.feedback = FeedbackDesk(FeedbackStore(s.feedback_db), self.recent, s.samples_dir, self.metrics,
                                         s.retry_after_s)
        for outbox in self.outboxes:
            outbox.start()
        if self.samples is not None:
            self.samples.start()
        if self.enabled:
            log.info("loop", extra={"sinks": [o.name for o in self.outboxes], "samples": self.samples is not None,
                                    "feedback": self.feedback is not None})

    def stop(self) -> None:
        """Drain (bounded) and close; call after the last answer."""
        for outbox in self.outboxes:
            outbox.stop()
        if self.samples is not None:
            self.samples.stop()
        if self.feedback is not None:
            self.feedback.store.close()

    def after_detect(self, request_id: str, model: dict[str, str], uploads: Sequence[UploadLike],
                     results: Sequence[dict[str, Any]], echo: dict[str, str],
                     answer_id: str | None = None) -> Answer | None:
        """Queue the answer for the sample policy and every sink (event loop; never raises).
        The Answer, for `remember` (None when nothing is configured)."""
        if not self.enabled:
            return None
        answer = None
        try:
            answer = Answer.of(request_id, model, uploads, results, echo, answer_id)
            if self.samples is not None:
                self.samples.offer(answer)
            if self.outboxes:
                messages = [ResultMessage(answer, i) for i in range(len(answer.results))]
                for outbox in self.outboxes:
                    for message in messages:
                        outbox.offer(message)
        except Exception:
            if not self._failed_once:
                self._failed_once = True
                log.exception("after-answer hooks failed (the answer was sent; logged once)")
        return answer

    async def remember(self, answer: Answer | None) -> None:
        """Keep the answer for feedback (never raises: with the shared state down, the answer
        still goes out; a verdict on it is then 404/503, counted by the link)."""
        if self.recent is None or answer is None:
            return
        try:
            await self.recent.remember(answer)
        except Exception as e:
            log.debug("answer %s not kept for feedback: %s", answer.answer_id, e)
