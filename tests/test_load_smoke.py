"""A short version of bench/load.py: a real server driven past saturation for ~8 s.

Only 200 and 503 may come back, every 503 carries Retry-After, the server stays ready and stops
cleanly on SIGTERM. Latency and RSS are reported by the full benchmark, not asserted here (CI
machines are too noisy for that).
"""
from __future__ import annotations

import json


def test_saturated_server_answers_only_200_or_503_with_retry_after(demo_artifact, tmp_path, bench_script):
    bench = bench_script("load")
    report = bench.run_load(demo_artifact, duration=8.0, max_requests=400, concurrency=24, queue_size=2,
                            max_batch_size=2, queue_delay_ms=2.0, warmup_s=1000.0, workdir=tmp_path)
    summary = {k: report[k] for k in ("status_counts", "transport_errors", "transport_error_samples",
                                      "missing_retry_after", "failures")}
    print(json.dumps(summary))
    assert set(report["status_counts"]) <= {"200", "503"}, summary
    assert report["status_counts"].get("200", 0) > 0, summary
    assert report["missing_retry_after"] == 0, summary
    assert report["server_alive_after_load"] and report["ready_after_load"], summary
    assert report["ok"], summary
