"""The loop with the line: everything that happens after `/detect` has answered.

A factory line does not stop at the answer. The result goes on to the line's systems, some
images are kept to retrain and recalibrate on, and an operator says where the model was wrong.
This package holds that loop, and nothing here can fail or slow a `/detect` request: each part
only queues on the event loop and does its work on its own thread.

    /detect answer ──> loop.LineLoop.after_detect(Answer)
                          ├─> sinks/        results to MQTT (mqtt.py) and signed webhooks
                          │                 (webhook.py), each through a bounded outbox
                          │                 (outbox.py): drop-oldest queue, rate limit,
                          │                 at-least-once delivery, one log line per outage
                          ├─> samples_policy which answered images to keep (per-product rules)
                          │   samples.py     writes them in the `folder` layout the offline
                          │                  tools read (train / calibrate / eval)
                          └─> recent.py      the recent answers, image bytes included, that
                                             operator feedback refers to
    POST /v1/feedback ──> feedback_routes.py (HTTP) -> feedback.py: the verdict on one image
                          of a recent answer, stored (SQLAlchemy) and written as a labelled
                          sample

The HTTP layer (`service.server.app`, `routes`, `state`) builds a `LineLoop` from the settings
and calls it; this package never imports the app, the pipeline, the micro-batcher or reload
(import-linter checks it).
"""
