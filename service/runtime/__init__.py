"""The inference runtime: artifact, backends, imaging, scoring, postprocess.

No FastAPI, no `training/`, and no torch unless the torch backend is chosen. The HTTP server
(`service.server`), evaluation and calibration (`training/`) and the benchmarks sit on top.
"""
