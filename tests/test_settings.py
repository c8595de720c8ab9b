"""DAPO_* environment parsing: comma lists, JSON lists, secrets hidden, consistency checks."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.server.settings import Settings


def test_defaults():
    s = Settings()
    assert s.backend == "onnxruntime" and s.providers is None and s.max_batch_size == 8
    assert s.max_body_bytes == 50 * 1024 * 1024 and s.api_keys == [] and s.cors_origins == []


def test_env_lists_and_secrets(monkeypatch):
    monkeypatch.setenv("DAPO_PROVIDERS", "TensorRT, CUDA,CPU")
    monkeypatch.setenv("DAPO_API_KEYS", "k1,k2")
    monkeypatch.setenv("DAPO_CORS_ORIGINS", '["http://hmi.local"]')
    monkeypatch.setenv("DAPO_LOG_LEVEL", "debug")
    monkeypatch.setenv("DAPO_MAX_QUEUE_DELAY_MS", "2.5")
    s = Settings()
    assert s.providers == ["TensorRT", "CUDA", "CPU"]
    assert [k.get_secret_value() for k in s.api_keys] == ["k1", "k2"]
    assert "k1" not in repr(s) and "k1" not in str(s.model_dump())
    assert s.cors_origins == ["http://hmi.local"] and s.log_level == "DEBUG" and s.max_queue_delay_ms == 2.5


def test_inconsistent_or_invalid_values_are_refused(monkeypatch):
    with pytest.raises(ValidationError):
        Settings(max_files=100, max_queue_size=10)
    monkeypatch.setenv("DAPO_BACKEND", "tensorflow")
    with pytest.raises(ValidationError):
        Settings()


def test_empty_env_values_mean_unset(monkeypatch):
    from service.server.settings import Settings

    monkeypatch.setenv("DAPO_API_KEYS_FILE", "")
    monkeypatch.setenv("DAPO_TRT_CACHE_DIR", " ")
    s = Settings()
    assert s.api_keys_file is None and s.trt_cache_dir is None
