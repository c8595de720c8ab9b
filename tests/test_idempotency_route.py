"""Idempotency-Key through the real /detect route (not only the fingerprint function).

A retry is replayed only when it asks for the same thing: any change to a query parameter, a
form field or the image is refused (422) or computed afresh, never answered with the stored
body. Keys belong to the caller: the same key sent with two API keys is two keys.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.server.app import create_app
from service.server.settings import Settings

ONE, TWO = {"X-API-Key": "k-one"}, {"X-API-Key": "k-two"}


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(demo_artifact):
    settings = Settings(artifact=demo_artifact, api_keys="k-one,k-two", warmup=False)
    with TestClient(create_app(settings, configure_logs=False)) as c:
        yield c


def post(client, key: str, query: str = "", image: bytes | None = None, auth=ONE, data=None):
    return client.post(f"/detect?{query}", headers={**auth, "Idempotency-Key": key},
                       files=[("image", ("part.png", image if image is not None else png(0), "image/png"))],
                       data=data or {})


def processed(client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("dapo_images_processed_total "):
            return float(line.split()[1])
    return 0.0


def assert_not_replayed(first, retry, changed: str) -> None:
    """Refused with 422, or a fresh answer: never the stored body under the replay header."""
    if retry.status_code == 422:
        assert retry.json()["error"]["code"] == "idempotency_conflict", retry.text
        return
    assert retry.status_code == 200, retry.text
    assert retry.headers.get("idempotent-replayed") is None, changed
    assert retry.content != first.content, changed


@pytest.mark.parametrize("first_query,retry_query", [
    ("threshold=0.9", "threshold=0.1"),
    ("mask_format=rle", "mask_format=png"),
    ("", "heatmap=true"),
    ("", "overlay=true"),
    ("", "defect_types=hole"),
    ("defect_types=hole", "defect_types=crack"),
])
def test_a_retry_that_changes_a_query_parameter_is_never_replayed(client, first_query, retry_query):
    key = f"query-{first_query}-{retry_query}"
    first = post(client, key, first_query)
    assert first.status_code == 200 and first.headers.get("idempotent-replayed") is None
    same = post(client, key, first_query)
    assert same.headers.get("idempotent-replayed") == "true" and same.content == first.content
    assert_not_replayed(first, post(client, key, retry_query), retry_query)


def test_a_retry_that_changes_a_form_field_or_the_image_is_never_replayed(client):
    first = post(client, "form-1", data={"part_id": "A-1"})
    assert first.status_code == 200
    assert_not_replayed(first, post(client, "form-1", data={"part_id": "A-2"}), "part_id")
    assert_not_replayed(first, post(client, "form-1", data={"part_id": "A-1", "product": "disc"}), "product")
    assert_not_replayed(first, post(client, "form-1", image=png(1), data={"part_id": "A-1"}), "image")


def test_the_same_key_under_two_api_keys_is_two_keys(client):
    before = processed(client)
    mine = post(client, "shared-key", image=png(5), auth=ONE)
    theirs = post(client, "shared-key", image=png(6), auth=TWO)  # another caller: not a conflict with mine
    assert mine.status_code == theirs.status_code == 200, theirs.text
    assert theirs.headers.get("idempotent-replayed") is None
    assert processed(client) == before + 2
    retry = post(client, "shared-key", image=png(6), auth=TWO)
    assert retry.headers.get("idempotent-replayed") == "true" and retry.content == theirs.content
    assert processed(client) == before + 2  # the replay ran nothing


def test_each_caller_gets_back_only_its_own_stored_answer(client):
    mine = post(client, "order-7", image=png(7), auth=ONE)
    theirs = post(client, "order-7", image=png(7), auth=TWO)
    assert theirs.status_code == 200 and theirs.headers.get("idempotent-replayed") is None
    assert theirs.json()["request_id"] != mine.json()["request_id"]  # a fresh answer, not mine
    again = post(client, "order-7", image=png(7), auth=ONE)
    assert again.headers.get("idempotent-replayed") == "true" and again.content == mine.content
