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


def test_cpu_pool_follows_the_available_cores_without_a_cap(monkeypatch, tmp_path):
    import os

    from service.server.state import available_cpus, cpu_workers

    assert Settings().cpu_threads is None
    assert cpu_workers(None) == available_cpus()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))  # a large GPU node
    cpu_max = tmp_path / "cpu.max"
    assert available_cpus(cpu_max) == 64  # no cgroup file: the affinity mask, no cap at 8
    cpu_max.write_text("max 100000\n")
    assert available_cpus(cpu_max) == 64
    cpu_max.write_text("150000 100000\n")  # docker --cpus=1.5
    assert available_cpus(cpu_max) == 2
    monkeypatch.setenv("DAPO_CPU_THREADS", "24")
    assert cpu_workers(Settings().cpu_threads) == 24
    monkeypatch.setenv("DAPO_CPU_THREADS", "")
    assert Settings().cpu_threads is None


def test_heatmap_cap_setting(monkeypatch):
    assert Settings().heatmap_max_side == 1024
    monkeypatch.setenv("DAPO_HEATMAP_MAX_SIDE", "0")
    assert Settings().heatmap_max_side == 0
    monkeypatch.setenv("DAPO_HEATMAP_MAX_SIDE", "-1")
    with pytest.raises(ValidationError):
        Settings()
