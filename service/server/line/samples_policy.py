"""Which answered images to keep: per-product rules, decided on the event loop in microseconds.

A policy maps a product name (or "*" for every product without rules of its own) to an ordered
list of rules; the first rule that matches an image keeps it, so one image is written once.

- ``every_nth``:      every n-th image of the product (a fixed-rate sample of normal production)
- ``near_threshold``: |anomaly_score - threshold| <= band (the calls most worth a second look)
- ``anomalous``:      every image the model flagged
- ``all``:            everything

Each rule has a ``cap`` (samples kept per product for that rule; the oldest go first) and a
``retention`` (older samples are deleted). Writing is `service.server.line.samples`' job.
"""
from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ANY_PRODUCT = "*"
RuleKind = Literal["every_nth", "near_threshold", "anomalous", "all"]


class SampleRule(BaseModel):
    """One rule of a product's policy (JSON: {"kind": "near_threshold", "band": 0.05, ...})."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: RuleKind
    n: int = Field(default=100, ge=1, description="every_nth: keep one image in n")
    band: float = Field(default=0.05, gt=0.0, le=1.0, description="near_threshold: half-width around the threshold")
    cap: int = Field(default=1000, ge=1, description="samples kept per product for this rule; oldest deleted first")
    retention: timedelta = Field(default=timedelta(days=30), description="samples older than this are deleted")

    @field_validator("retention")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value.total_seconds() <= 0:
            raise ValueError("retention must be positive")
        return value


def check_policy(rules: Mapping[str, list[SampleRule]]) -> None:
    """A kind may appear once per product: samples/<kind>/<product>/ is that rule's folder."""
    for product, product_rules in rules.items():
        kinds = [r.kind for r in product_rules]
        if len(kinds) != len(set(kinds)):
            raise ValueError(f"samples_policy[{product!r}] lists a rule kind twice: {kinds}")


class SamplePolicy:
    """Decides per image; keeps the every_nth counters (event loop only, no locking)."""

    def __init__(self, rules: Mapping[str, list[SampleRule]]):
        check_policy(rules)
        self.rules = {product: tuple(r) for product, r in rules.items()}
        self._seen: dict[tuple[str, str], int] = {}

    @property
    def enabled(self) -> bool:
        return any(self.rules.values())

    def rules_for(self, product: str | None) -> tuple[SampleRule, ...]:
        if product is not None and product in self.rules:
            return self.rules[product]
        return self.rules.get(ANY_PRODUCT, ())

    def choose(self, product: str | None, score: float, threshold: float, anomalous: bool) -> SampleRule | None:
        """The first matching rule for this image, or None. Every every_nth rule counts the image."""
        chosen = None
        for rule in self.rules_for(product):
            if self._matches(rule, product, score, threshold, anomalous) and chosen is None:
                chosen = rule
        return chosen

    def _matches(self, rule: SampleRule, product: str | None, score: float, threshold: float,
                 anomalous: bool) -> bool:
        if rule.kind == "every_nth":
            key = (product or "", rule.kind)
            count = self._seen.get(key, 0) + 1
            self._seen[key] = count
            return count % rule.n == 0
        if rule.kind == "near_threshold":
            return abs(score - threshold) <= rule.band
        if rule.kind == "anomalous":
            return anomalous
        return True  # all
