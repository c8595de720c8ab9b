"""Answered images written to disk in the `folder` layout, so they go back into the offline tools.

The layout is the one `dapo train / calibrate / eval --layout folder` read
(training/data/folder.py; the tests load what is written here with that very loader):

    <root>/<product>/good/<stem>.<ext>                       good parts
    <root>/<product>/<defect_type>/<stem>.<ext>              defective, one folder per type
    <root>/<product>/ground_truth/<defect_type>/<stem>_mask.png   its mask (0 / 255)

plus `<stem>.json` beside each image (the result without images, who labelled it and why it
was kept; the loaders read images only). Roots: `<samples_dir>/<rule kind>/` for samples kept
by policy (labelled by the MODEL: its verdict, its top defect type, its mask) and
`<samples_dir>/feedback/` for samples labelled by an OPERATOR (service.server.line.feedback). An
image the model flagged without any defect pixels has no type to file it under; a policy
sample of that kind goes to `<product>/.unlabelled/` (kept for review, skipped by the loaders).

The original upload bytes are written as they came (no re-encode), unless EXIF rotates them:
then the oriented image is written as PNG, so image and mask sizes agree.

Crash safety: every file is written under a hidden temporary name in its own folder
(`.tmp-<random>-<name>`: the loaders skip hidden files), fsynced, then renamed over its final
name (atomic on POSIX); the sidecar goes last, after the folders are fsynced, so a sample is
complete exactly when its sidecar exists and lists files that all exist. What a crash (SIGKILL,
power loss) leaves half-done is removed at the next start by `sweep_incomplete` (counted in
`dapo_samples_swept_total`, named in one log line); the `folder` loader skips it meanwhile.

Policy samples are written by one writer thread from a bounded queue (full: the sample is not
kept, and counted); every OSError (disk full, permission) is counted by errno name, logged once
per streak, and never reaches the request. Per rule and product the newest `cap` samples are
kept and nothing older than `retention`; the index of what is kept is rebuilt from the sidecars
at start-up, so caps hold across restarts.
"""
from __future__ import annotations

import base64
import errno
import io
import json
import logging
import os
import queue
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from service.server.answers import Answer, iso_utc, public_result
from service.server.metrics import LoopMetrics
from service.server.line.samples_policy import SamplePolicy, SampleRule

log = logging.getLogger("dapo.samples")

GOOD = "good"  # folder names of the `folder` layout (training/data/folder.py)
GROUND_TRUTH = "ground_truth"
UNLABELLED = ".unlabelled"
NO_PRODUCT = "_unspecified"
FEEDBACK_ROOT = "feedback"
MAX_SWEEP_INTERVAL_S = 60.0
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}
_EXIF_ORIENTATION = 0x0112
TMP_PREFIX = ".tmp-"  # hidden: the loaders skip it; swept at start
ROOTS = ("every_nth", "near_threshold", "anomalous", "all", FEEDBACK_ROOT)  # folders this module owns
_STEM = re.compile(r"^\d{8}T\d{6}_")  # the names sample_stem makes (the sweep touches nothing else)
_IMAGE_SUFFIXES = frozenset(_EXTENSIONS.values()) | {".jpeg", ".tiff"}


def folder_name(text: str | None, fallback: str = NO_PRODUCT) -> str:
    """A product or class name as one safe path component ('a/b' -> 'a_b', never '.' or '..')."""
    if not text:
        return fallback
    name = _UNSAFE.sub("_", text.replace(" ", "_"))[:64].lstrip(".")
    return name or fallback


def sample_stem(answer: Answer, index: int) -> str:
    """Sorts by time; unique per image: the server's answer id (never the caller's request id,
    which a client may reuse) and the file index."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(answer.inspected_at))
    return f"{stamp}_{answer.answer_id}_{index}"


@dataclass(frozen=True)
class Label:
    """Where an image goes: `good`, a defect word, or UNLABELLED; with the mask to write."""

    name: str
    mask: np.ndarray | None = None  # bool H x W, defect pixels

    @property
    def folder(self) -> str:
        return self.name if self.name in (GOOD, UNLABELLED) else folder_name(self.name, "defect")


def result_mask(result: dict[str, Any]) -> np.ndarray | None:
    """All defect pixels of a result as one bool H x W mask (None when the answer had no mask)."""
    mask = result.get("mask")
    if not mask:
        return None
    if mask.get("format") == "rle":
        out = np.zeros((result["height"], result["width"]), dtype=bool)
        for rle in (mask.get("rle") or {}).values():
            out |= mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)
        return out
    if mask.get("format") == "png" and mask.get("png"):
        with Image.open(io.BytesIO(base64.b64decode(mask["png"]))) as png:
            return np.asarray(png) != 0
    return None


def model_label(result: dict[str, Any]) -> Label:
    """The model's own call: good, or its top defect type with its mask."""
    if not result.get("is_anomalous"):
        return Label(GOOD)
    types = result.get("defect_types") or []
    if not types:
        return Label(UNLABELLED)
    return Label(types[0]["name"], result_mask(result))


def image_payload(data: bytes) -> tuple[bytes, str]:
    """The bytes to write and their extension: the upload itself unless EXIF rotates it."""
    with Image.open(io.BytesIO(data)) as img:
        ext = _EXTENSIONS.get(img.format or "")
        if ext is not None and orientation(img) == 1:
            return data, ext
        img.load()
        oriented = ImageOps.exif_transpose(img)
        buf = io.BytesIO()
        oriented.save(buf, "PNG")
        return buf.getvalue(), ".png"


def orientation(img: Image.Image) -> int:
    """The EXIF orientation, from the header only. A PNG's EXIF is read when its eXIf chunk
    precedes the pixel data (where the PNG spec asks for it): PIL's getexif() on a PNG would
    decode the whole image to look for a late one."""
    if img.format == "PNG":
        raw = img.info.get("exif")
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
        return exif.get(_EXIF_ORIENTATION, 1)
    return img.getexif().get(_EXIF_ORIENTATION, 1)


def write_atomic(path: Path, data: bytes) -> None:
    """`data` at `path` or nothing: a temporary name in the same folder, fsync, rename."""
    tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(folder: Path) -> None:
    """Make the renames in `folder` durable (the directory entry, not only the data)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def png_bytes(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, "PNG")
    return buf.getvalue()


def write_sample(root: Path, product: str | None, label: Label, stem: str, image: bytes,
                 sidecar: dict[str, Any]) -> list[Path]:
    """Image, mask and sidecar JSON, each atomically; the sidecar last (it marks a complete
    sample). On an OSError whatever was written is removed and the error raised."""
    product_dir = root / folder_name(product)
    class_dir = product_dir / label.folder
    written: list[Path] = []
    try:
        payload, ext = image_payload(image)
        class_dir.mkdir(parents=True, exist_ok=True)
        written.append(class_dir / f"{stem}{ext}")
        write_atomic(written[-1], payload)
        if label.mask is not None and label.name not in (GOOD, UNLABELLED):
            mask_dir = product_dir / GROUND_TRUTH / label.folder
            mask_dir.mkdir(parents=True, exist_ok=True)
            written.append(mask_dir / f"{stem}_mask.png")
            write_atomic(written[-1], png_bytes(label.mask))
            fsync_dir(mask_dir)
        fsync_dir(class_dir)
        side = class_dir / f"{stem}.json"
        doc = {**sidecar, "label": label.name, "files": [str(p.relative_to(root)) for p in written + [side]]}
        write_atomic(side, json.dumps(doc, indent=1).encode("utf-8"))
        written.append(side)
        fsync_dir(class_dir)
    except BaseException:
        remove(written)
        raise
    return written


def sample_complete(side: Path, root: Path) -> bool:
    """The sidecar parses and every file it lists exists (inside `root`)."""
    try:
        doc = json.loads(side.read_text(encoding="utf-8"))
        files = [root / f for f in doc["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(f.resolve().is_relative_to(root.resolve()) and f.exists() for f in files)


def incomplete_samples(root: Path) -> list[Path]:
    """Files under one samples root (`<samples_dir>/<kind>`) that belong to no complete sample:
    temporary files, sidecars that do not parse or list a missing file, images and masks without
    their sidecar. Only names this module makes are considered."""
    found: list[Path] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.name
        if name.startswith(TMP_PREFIX):
            found.append(path)
            continue
        if not _STEM.match(name):
            continue
        if path.suffix == ".json":
            if not sample_complete(path, root):
                found.append(path)
        elif path.parent.parent.name == GROUND_TRUTH and name.endswith("_mask.png"):
            side = path.parent.parent.parent / path.parent.name / f"{name[:-len('_mask.png')]}.json"
            if not sample_complete(side, root):
                found.append(path)
        elif path.suffix.lower() in _IMAGE_SUFFIXES:
            if not sample_complete(path.with_suffix(".json"), root):
                found.append(path)
    return found


def sweep_incomplete(samples_dir: Path) -> list[Path]:
    """Remove what a crash left half-written under every samples root (call at start, before
    any writer runs). The paths removed; one log line when there were any."""
    swept: list[Path] = []
    for kind in ROOTS:
        root = Path(samples_dir) / kind
        if root.is_dir():
            for path in incomplete_samples(root):
                path.unlink(missing_ok=True)
                swept.append(path)
    if swept:
        log.warning("removed %d incomplete sample file(s) (a crash mid-write): %s", len(swept),
                    ", ".join(str(p) for p in swept[:5]) + (" ..." if len(swept) > 5 else ""),
                    extra={"swept": len(swept)})
    return swept


def remove(paths: list[Path]) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def sidecar_of(answer: Answer, index: int, labelled_by: str, **extra: Any) -> dict[str, Any]:
    result = answer.results[index]
    return {"answer_id": answer.answer_id, "request_id": answer.request_id, "index": index, "filename": answer.files[index][0],
            "product": answer.product, "labelled_by": labelled_by, "model": answer.model,
            "inspected_at": iso_utc(answer.inspected_at), "result": public_result(result), **extra}


class ErrorCounter:
    """Counts failed writes by errno name (or exception type); logs the first of a streak (until a
    write succeeds)."""

    def __init__(self, metrics: LoopMetrics):
        self._metrics = metrics
        self._streak = False

    def failed(self, e: Exception, what: str) -> None:
        code = e.errno if isinstance(e, OSError) else None
        reason = errno.errorcode.get(code, type(e).__name__) if code else type(e).__name__
        self._metrics.samples_errors.labels(reason).inc()
        if not self._streak:
            self._streak = True
            log.warning("cannot write %s: %s (further failures are counted, not logged)", what, e)

    def succeeded(self) -> None:
        self._streak = False


@dataclass
class _Kept:
    written: float  # time.time() when written (the sidecar's mtime after a restart)
    files: list[Path]


class SampleKeeper:
    """The policy, the writer thread and the index of kept samples (caps and retention)."""

    def __init__(self, root: Path, policy: SamplePolicy, queue_size: int, metrics: LoopMetrics):
        self.root, self.policy, self.metrics = Path(root), policy, metrics
        self._queue: queue.Queue[tuple[Answer, int, SampleRule] | None] = queue.Queue(queue_size)
        self._kept: dict[tuple[str, str], deque[_Kept]] = {}
        self._rules: dict[tuple[str, str], SampleRule] = {}
        self._errors = ErrorCounter(metrics)
        self._thread: threading.Thread | None = None

    # --- event loop side ----------------------------------------------------------------------
    def offer(self, answer: Answer) -> None:
        """Decide per image (microseconds) and queue what the policy keeps; never blocks."""
        for index, result in enumerate(answer.results):
            rule = self.policy.choose(answer.product, result["anomaly_score"], result["threshold"],
                                      bool(result["is_anomalous"]))
            if rule is None:
                continue
            try:
                self._queue.put_nowait((answer, index, rule))
            except queue.Full:
                self.metrics.samples_dropped.inc()

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dapo-samples", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued (up to `timeout`), then end the thread."""
        if self._thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)

    # --- writer thread -------------------------------------------------------------------------
    def _run(self) -> None:
        self._scan()
        interval = self._sweep_interval()
        next_sweep = time.monotonic() + interval
        while True:
            try:
                job = self._queue.get(timeout=max(0.01, next_sweep - time.monotonic()))
            except queue.Empty:
                job = ()
            if job is None:
                return
            if job:
                self._write(*job)
            if time.monotonic() >= next_sweep:
                self._sweep()
                next_sweep = time.monotonic() + interval

    def _sweep_interval(self) -> float:
        shortest = min((r.retention.total_seconds() for rules in self.policy.rules.values() for r in rules),
                       default=MAX_SWEEP_INTERVAL_S)
        return min(MAX_SWEEP_INTERVAL_S, max(0.05, shortest / 4))

    def _write(self, answer: Answer, index: int, rule: SampleRule) -> None:
        key = (rule.kind, folder_name(answer.product))
        self._rules[key] = rule
        try:
            files = write_sample(self.root / rule.kind, answer.product, model_label(answer.results[index]),
                                 sample_stem(answer, index), answer.files[index][1],
                                 sidecar_of(answer, index, "model", rule=rule.model_dump(mode="json")))
        except Exception as e:  # OSError: disk full, permission; anything else must not stop the writer either
            self._errors.failed(e, f"sample under {self.root / rule.kind}")
            return
        self._errors.succeeded()
        self.metrics.samples_written.labels(rule.kind).inc()
        kept = self._kept.setdefault(key, deque())
        kept.append(_Kept(time.time(), files))
        self._trim(kept, rule)

    def _sweep(self) -> None:
        for key, kept in self._kept.items():
            rule = self._rules.get(key)
            if rule is not None:
                self._expire(kept, rule)

    def _trim(self, kept: deque[_Kept], rule: SampleRule) -> None:
        """The newest `cap` samples, none older than `retention`."""
        while len(kept) > rule.cap:
            self._delete(kept.popleft(), "cap")
        self._expire(kept, rule)

    def _expire(self, kept: deque[_Kept], rule: SampleRule) -> None:
        oldest_allowed = time.time() - rule.retention.total_seconds()
        while kept and kept[0].written < oldest_allowed:
            self._delete(kept.popleft(), "retention")

    def _delete(self, kept: _Kept, reason: str) -> None:
        try:
            remove(kept.files)
        except OSError as e:
            self._errors.failed(e, f"old sample {kept.files[0]}")
            return
        self.metrics.samples_deleted.labels(reason).inc()

    def _scan(self) -> None:
        """Rebuild the index of kept samples from their sidecars (oldest first per rule/product)."""
        for kind in sorted({r.kind for rules in self.policy.rules.values() for r in rules}):
            base = (self.root / kind).resolve()
            for side in (self.root / kind).glob("*/*/*.json"):
                try:
                    doc = json.loads(side.read_text(encoding="utf-8"))
                    files = [(base / f).resolve() for f in doc["files"]]
                    written = side.stat().st_mtime
                except (OSError, ValueError, KeyError, TypeError):
                    continue  # not one of ours, or half-written: left alone
                if not all(f.is_relative_to(base) for f in files):
                    continue  # never delete outside the samples folder
                self._kept.setdefault((kind, side.parent.parent.name), deque()).append(_Kept(written, files))
        for key, unsorted in self._kept.items():
            kept = self._kept[key] = deque(sorted(unsorted, key=lambda k: k.written))
            rule = self._rule_for(key)
            if rule is not None:
                self._rules[key] = rule
                self._trim(kept, rule)

    def _rule_for(self, key: tuple[str, str]) -> SampleRule | None:
        kind, product_folder = key
        for product in (product_folder, "*"):
            for rule in self.policy.rules.get(product, ()):
                if rule.kind == kind:
                    return rule
        return None
