"""Operator feedback: "this call was wrong", against an answer, turned into a labelled sample.

A verdict names one image of a recent answer by the answer's `answer_id` (the server's id,
unique) and the image's `index`. Naming the caller's `request_id` instead still works while it
names one answer; when two answers share it (a gateway that reuses its cycle number) the
verdict is refused (409 `ambiguous_request_id`), never filed against a guess.

A verdict names the truth about one image:

| verdict          | the answer was | the truth (sample folder)        | mask written               |
|------------------|----------------|----------------------------------|----------------------------|
| correct          | OK             | good                             | -                          |
| correct          | anomalous      | the model's top type (or given)  | the model's defect pixels  |
| false_positive   | anomalous      | good                             | -                          |
| false_negative   | OK             | defect_type (required)           | none (image label only)    |
| wrong_type       | anomalous      | defect_type (required)           | the model's defect pixels  |

A verdict that contradicts the answer (false_positive on an OK answer...) is refused (422), so
the database never holds a label that cannot be true. The row goes to the feedback database
(the unique (answer_id, index) pair refuses duplicates: 409), then the image and its label go
to `<samples_dir>/feedback/` in the `folder` layout; a failed write is counted and reported
(`sample: null`), never loses the verdict.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.server.answers import Answer
from service.server.errors import ApiError, retry_headers
from service.server.metrics import LoopMetrics
from service.server.line.recent import Ambiguous, Expired, RecentStore, UnknownRequest
from service.server.line.samples import (FEEDBACK_ROOT, GOOD, ErrorCounter, Label, result_mask, sample_stem,
                                    sidecar_of, write_sample)

if TYPE_CHECKING:  # SQLAlchemy (~0.3 s to import) loads only where feedback is configured
    from service.runtime.feedback_store import FeedbackRecord, FeedbackStore

log = logging.getLogger("dapo.feedback")

Verdict = Literal["correct", "false_positive", "false_negative", "wrong_type"]
MAX_BODY_BYTES = 16 * 1024


class FeedbackIn(BaseModel):
    """POST /v1/feedback body."""

    # The schema requires answer_id, the way a MES names an answer (docs/api.md). The service also
    # takes request_id alone, as clients of the earlier API send it (refused when ambiguous); the
    # schema leaves that out on purpose: an "either of two" rule (a top-level anyOf) makes client
    # generators drop the model, and nothing the schema allows is ever refused for lack of an id.
    model_config = ConfigDict(extra="forbid", json_schema_extra=lambda schema: schema.setdefault(
        "required", []).insert(0, "answer_id"))

    # typed `str` with a None default (not `str | None`): absent is allowed, null is not
    answer_id: str = Field(default=None, min_length=1, max_length=64,  # type: ignore[assignment]
                           description="answer_id of the /detect answer (preferred: unique)")
    request_id: str = Field(default=None, min_length=1, max_length=128,  # type: ignore[assignment]
                            description="X-Request-ID of the /detect answer; refused (409) when several "
                                        "answers share it")
    index: int = Field(default=0, ge=0, description="which image of that request (upload order)")
    verdict: Verdict
    defect_type: str | None = Field(default=None, min_length=1, max_length=64,
                                    description="the true type (false_negative, wrong_type)")
    note: str | None = Field(default=None, max_length=1000)

    @model_validator(mode="after")
    def _names_an_answer(self) -> "FeedbackIn":
        if self.answer_id is None and self.request_id is None:
            raise ValueError("name the answer: answer_id (or request_id)")
        return self


class FeedbackOut(BaseModel):
    id: int
    answer_id: str
    request_id: str
    index: int
    verdict: Verdict
    label: str = Field(description='the truth this verdict implies: "good" or a defect type')
    sample: str | None = Field(description="the labelled image written in the folder layout (null: not written)")


def invalid(message: str) -> ApiError:
    return ApiError(422, "invalid_feedback", message)


def predicted_type(result: dict[str, Any]) -> str | None:
    """The model's top defect type for this result (None when it named none)."""
    return (result.get("defect_types") or [{}])[0].get("name")


def truth_label(body: FeedbackIn, result: dict[str, Any], vocabulary: list[str]) -> Label:
    """The label a verdict gives this result; 422 when the verdict contradicts the answer."""
    if body.defect_type is not None and body.defect_type not in vocabulary:
        raise invalid(f"defect_type {body.defect_type!r} is not in the model's vocabulary {vocabulary}")
    anomalous = bool(result["is_anomalous"])
    top = predicted_type(result)
    verdict = body.verdict
    if verdict in ("false_positive", "wrong_type") and not anomalous:
        raise invalid(f"{verdict}: the answer was not anomalous (use false_negative or correct)")
    if verdict == "false_negative" and anomalous:
        raise invalid("false_negative: the answer was anomalous (use false_positive, wrong_type or correct)")
    if verdict in ("false_negative", "wrong_type") and body.defect_type is None:
        raise invalid(f"{verdict} needs defect_type: the true type (one of {vocabulary})")
    if verdict == "false_positive" or (verdict == "correct" and not anomalous):
        return Label(GOOD)
    if verdict == "false_negative":
        return Label(body.defect_type)  # type: ignore[arg-type]
    if verdict == "wrong_type":
        if body.defect_type == top:
            raise invalid(f"wrong_type: {top!r} is the type the model answered")
        return Label(body.defect_type, result_mask(result))  # type: ignore[arg-type]
    # correct and anomalous: the model's type
    if top is None and body.defect_type is None:
        raise invalid("correct: the answer named no defect type; give defect_type")
    if top is not None and body.defect_type not in (None, top):
        raise invalid(f"correct: the model answered {top!r}, not {body.defect_type!r} (use wrong_type)")
    return Label(top or body.defect_type, result_mask(result))  # type: ignore[arg-type]


class FeedbackDesk:
    """Takes verdicts: checks them against the recent answer, stores them, writes the sample."""

    def __init__(self, store: FeedbackStore, recent: RecentStore, samples_dir: Path | None, metrics: LoopMetrics,
                 retry_after_s: int = 1):
        self.store, self.recent, self.metrics, self.retry_after_s = store, recent, metrics, retry_after_s
        self.root = Path(samples_dir) / FEEDBACK_ROOT if samples_dir is not None else None
        self._errors = ErrorCounter(metrics)

    async def answer_for(self, body: FeedbackIn) -> Answer:
        name = f"answer {body.answer_id}" if body.answer_id is not None else f"request {body.request_id}"
        try:
            if body.answer_id is not None:
                answer = await self.recent.by_answer(body.answer_id)
            else:
                answer = await self.recent.by_request(body.request_id)  # type: ignore[arg-type]
        except Expired:
            raise ApiError(410, "feedback_expired", f"{name} is older than the feedback window (or was "
                           "evicted to bound memory); its image is no longer kept") from None
        except UnknownRequest:
            raise ApiError(404, "unknown_request", f"no {name} (since the feedback store started)") from None
        except Ambiguous as e:
            raise ApiError(409, "ambiguous_request_id", f"{len(e.answer_ids)} answers share request id "
                           f"{body.request_id}: name the one meant by its answer_id") from None
        if body.request_id is not None and body.request_id != answer.request_id:
            raise invalid(f"answer {answer.answer_id} was given under request id {answer.request_id}, "
                          f"not {body.request_id}")
        if body.index >= len(answer.results):
            raise invalid(f"index {body.index} out of range: {name} had {len(answer.results)} image(s)")
        return answer

    async def submit(self, body: FeedbackIn, principal: str, vocabulary: list[str],
                     known_products: set[str]) -> FeedbackOut:
        from service.runtime.feedback_store import DuplicateFeedback, FeedbackRecord  # loaded with the store

        answer = await self.answer_for(body)
        result = answer.results[body.index]
        label = truth_label(body, result, vocabulary)
        record = FeedbackRecord(
            request_id=answer.request_id, answer_id=answer.answer_id, image_index=body.index, verdict=body.verdict, label=label.name,
            defect_type=body.defect_type, note=body.note, product=answer.product,
            part_id=answer.echo.get("part_id"), station_id=answer.echo.get("station_id"),
            recipe_id=answer.echo.get("recipe_id"), filename=answer.files[body.index][0],
            model_name=answer.model.get("name"), model_version=answer.model.get("version"),
            anomaly_score=result["anomaly_score"], threshold=result["threshold"],
            is_anomalous=bool(result["is_anomalous"]),
            predicted_type=predicted_type(result), principal=principal)
        from sqlalchemy.exc import DBAPIError

        try:
            row_id, sample = await asyncio.to_thread(self._record, record, answer, label)
        except DBAPIError as e:  # the database is down or unreachable (not a duplicate: that is below)
            log.warning("feedback database unavailable: %s", type(e.orig or e).__name__)
            raise ApiError(503, "feedback_db_unavailable", "the feedback database is not reachable; retry",
                           retry_headers(self.retry_after_s)) from None
        except DuplicateFeedback:
            raise ApiError(409, "duplicate_feedback", f"image {body.index} of answer {answer.answer_id} "
                           "already has feedback") from None
        product = answer.product if answer.product in known_products else ("none" if answer.product is None
                                                                            else "other")
        self.metrics.feedback.labels(product, body.verdict).inc()
        return FeedbackOut(id=row_id, answer_id=answer.answer_id, request_id=answer.request_id, index=body.index, verdict=body.verdict,
                           label=label.name, sample=sample)

    def _record(self, record: FeedbackRecord, answer: Answer, label: Label) -> tuple[int, str | None]:
        """(worker thread) The row first (it decides duplicates), then the labelled sample."""
        row_id = self.store.add(record)
        if self.root is None:
            return row_id, None
        index = record.image_index
        sidecar = sidecar_of(answer, index, "operator",
                            feedback={"id": row_id, "verdict": record.verdict, "defect_type": record.defect_type,
                                      "note": record.note})
        try:
            files = write_sample(self.root, answer.product, label, sample_stem(answer, index),
                                 answer.files[index][1], sidecar)
        except Exception as e:  # the verdict is stored; a sample that cannot be written is counted
            self._errors.failed(e, f"feedback sample under {self.root}")
            return row_id, None
        self._errors.succeeded()
        self.metrics.samples_written.labels(FEEDBACK_ROOT).inc()
        image = str(files[0].resolve())
        self.store.set_sample(row_id, image)
        return row_id, image
