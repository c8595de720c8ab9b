"""`dapo bench --mode cpu-path`: what the service costs on the CPU per image, at camera sizes.

On a GPU node the encoder takes a few milliseconds; decode, resize, masks, PNGs and JSON run on
the CPU and decide how many images per second the node can take. This benchmark measures that
side on photo-like JPEGs at 0.3, 5 and 20 MP (or on your own photos, `--photos DIR`):

- ``stages``: in this process, the exact CPU stages the server runs (Detector.prepare ->
  Detector.render -> JSON encode; the encoder's outputs for the image computed once before),
  per image: median wall ms and median *thread CPU* ms (CPU time is what a busy, shared machine
  distorts least), for each mask format, without and with heatmap + overlay; next to a plain
  full decode + bicubic resize to S of the same file, in the same run (the ratio is the figure
  to compare across machines);
- ``http``: the same over HTTP on a real server process, one request at a time: median wall ms
  and the server process's CPU ms per request (/proc), beside the bare encoder's;
- ``throughput``: N concurrent clients on the 5 MP JPEG (RLE): images/s and server CPU per
  image; ``projected_img_per_s_per_core`` = 1000 / the service's CPU ms per 5 MP image;
- ``thread_scaling``: decode + preprocess of the same images in 1 vs all CPU threads (Pillow
  releases the GIL while decoding and resizing);
- ``png_levels`` and ``json``: the zlib level trade-off for mask and heatmap PNGs, and json vs
  orjson on real answers;
- ``tiled``: the 5 MP image as a tiled product (N x N tiles, `service.runtime.tiling`) against the
  same image untiled, in the same run: thread CPU ms of everything but the encoder (decode once,
  cut the tiles, the whole-image pass's resize, stitch, render, JSON) and the ratio, the budget
  of docs/tiling.md; `prepare_cpu_ms` (decode and preprocess alone) and `floor_ratio_cpu`, the
  tiled prepare against the whole untiled request: what no stitching or rendering work can beat.

Synthetic images are not photos: they are built to have a photo's statistics (structure at
every scale, grain, sensor noise, JPEG q90), which is what decode and resize costs depend on.
"""
from __future__ import annotations

import io
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service.runtime import postprocess
from service.runtime.artifact import Tiling
from service.runtime.detector import Detector, ImageLimits, RuntimeOptions, Upload
from service.server.routes import encode_json
from service.server.state import cpu_workers

SIZES: dict[str, tuple[int, int]] = {"0.3MP": (640, 480), "5MP": (2448, 2048), "20MP": (5472, 3648)}
MASK_FORMATS: tuple[postprocess.MaskFormat, ...] = ("rle", "png", "none")
LIMITS = ImageLimits(max_pixels=40_000_000, max_side=16384)
VIEW_MAX_SIDE = 1024  # the service's default heatmap/overlay cap (DAPO_HEATMAP_MAX_SIDE)


@dataclass(frozen=True)
class CpuPathOptions:
    """What to run: repetitions per configuration, concurrent clients, the uploads."""

    reps: int = 7
    http_reps: int = 5
    concurrency: int = 4
    throughput_requests: int = 24
    photos: Path | None = None  # a folder of JPEGs to use instead of the synthetic ones
    http: bool = True
    tiles: int = 4  # the tiled section's grid (N x N on the 5 MP image); 0 = skip it
    tiled_only: bool = False  # only the tiled section (and the machine load)


# --- images -----------------------------------------------------------------------------------
def photo_like_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A JPEG with a photo's statistics: octaves of smooth structure (a 1/f-like spectrum),
    a few dark marks, fine grain and sensor noise."""
    rng = np.random.default_rng(seed)
    arr = np.zeros((height, width, 3), np.float32)
    for octave, amplitude in ((256, 60.0), (64, 30.0), (16, 15.0), (4, 8.0)):
        grid = rng.normal(0.0, 1.0, (height // octave + 2, width // octave + 2, 3)).astype(np.float32)
        layer = np.stack([np.asarray(Image.fromarray(grid[..., c], mode="F").resize(
            (width, height), Image.Resampling.BICUBIC)) for c in range(3)], axis=-1)
        arr += amplitude * layer
    arr += 128.0
    for _ in range(3):  # scratches
        y, x = int(rng.integers(0, height - 8)), int(rng.integers(0, width // 2))
        arr[y:y + max(2, height // 400), x:x + width // 3] *= 0.35
    arr += rng.normal(0.0, 3.0, (height, width, 1)).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def uploads(options: CpuPathOptions) -> dict[str, bytes]:
    """name -> JPEG bytes: the user's photos, or one photo-like image per size."""
    if options.photos is not None:
        files = sorted(p for p in options.photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        if not files:
            raise SystemExit(f"{options.photos}: no .jpg/.jpeg files")
        out = {}
        for p in files:
            with Image.open(p) as im:
                out[f"{p.name} ({im.width}x{im.height}, {im.width * im.height / 1e6:.1f}MP)"] = p.read_bytes()
        return out
    return {name: photo_like_jpeg(w, h, seed=i) for i, (name, (w, h)) in enumerate(SIZES.items())}


# --- timing helpers ---------------------------------------------------------------------------
def _median_ms(values: list[float]) -> float:
    return round(1000.0 * statistics.median(values), 2)


def timed(fn: Callable[[], Any], reps: int) -> tuple[float, float, Any]:
    """(median wall ms, median thread-CPU ms, last result) of `reps` calls."""
    walls, cpus, result = [], [], None
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.thread_time()
        result = fn()
        cpus.append(time.thread_time() - c0)
        walls.append(time.perf_counter() - w0)
    return _median_ms(walls), _median_ms(cpus), result


def full_decode_resize(data: bytes, size: int) -> Image.Image:
    """The yardstick: a plain full-resolution decode and a bicubic resize to S x S."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)


def configurations() -> Iterator[tuple[str, postprocess.RenderOptions]]:
    """Each mask format, without and with heatmap + overlay (capped as the service does)."""
    for fmt in MASK_FORMATS:
        yield fmt, postprocess.RenderOptions(fmt)
        yield f"{fmt}+heatmap+overlay", postprocess.RenderOptions(fmt, True, True, view_max_side=VIEW_MAX_SIDE)


def service_work(detector: Detector, data: bytes, options: postprocess.RenderOptions,
                 tiles: Tiling | None = None) -> Callable[[], bytes]:
    """Everything the service does on the CPU for one image (decode, preprocess, render, JSON),
    with the encoder's outputs for this image computed once beforehand: the accelerator's
    share is not the service's, and subtracting a timed encoder call would add its noise."""
    view = options.view_max_side if options.overlay else None
    policy = detector.policy()
    first = detector.prepare(Upload("bench.jpg", data), LIMITS, view, tiles=tiles)
    inputs = first.inputs()
    outputs = detector.infer_inputs(inputs, policy.allowed, batch_size=len(inputs))

    def work() -> bytes:
        prep = detector.prepare(Upload("bench.jpg", data), LIMITS, view, tiles=tiles)
        fields = detector.render(prep, outputs, policy, options)
        return encode_json({"request_id": "bench", "model": {"name": detector.name}, "results": [fields]})

    return work


# --- the parts ----------------------------------------------------------------------------------
def bench_stages(detector: Detector, images: dict[str, bytes], reps: int) -> list[dict]:
    """Per image and configuration: service ms (wall, thread CPU) vs a plain full decode+resize."""
    size = detector.manifest.image_size
    x = np.zeros((1, 3, size, size), np.float32)
    allowed = detector.policy().allowed[None]
    enc_wall, enc_cpu, _ = timed(lambda: detector.infer(x, allowed), reps)
    rows = []
    for name, data in images.items():
        base_wall, base_cpu, _ = timed(lambda: full_decode_resize(data, size), reps)
        for label, options in configurations():
            work = service_work(detector, data, options)
            work()  # warm caches
            wall, cpu, body = timed(work, reps)
            rows.append({"image": name, "config": label, "service_ms": wall, "service_cpu_ms": cpu,
                         "full_decode_resize_ms": base_wall, "full_decode_resize_cpu_ms": base_cpu,
                         "ratio_cpu": round(cpu / base_cpu, 3), "ratio_wall": round(wall / base_wall, 3),
                         "answer_kb": round(len(body) / 1024, 1)})
    return [{"encoder_ms": enc_wall, "encoder_cpu_ms": enc_cpu}, *rows]


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def served(artifact: Path) -> Iterator[tuple[Any, int]]:
    """A real server process (default settings) and an HTTP client on it."""
    import httpx

    from service.server.local_server import Server

    with Server(artifact, {"DAPO_MAX_QUEUE_DELAY_MS": "0"}) as server, \
            httpx.Client(base_url=server.url, timeout=300) as client:
        yield client, server.pid


def _post(client: Any, data: bytes, options: postprocess.RenderOptions) -> None:
    params = {"mask_format": options.mask_format, "heatmap": str(options.heatmap).lower(),
              "overlay": str(options.overlay).lower()}
    client.post("/detect", params=params, files={"image": ("bench.jpg", data, "image/jpeg")}).raise_for_status()


def bench_http(artifact: Path, images: dict[str, bytes], reps: int) -> list[dict]:
    """One request at a time: median wall ms and the server process's CPU ms per request."""
    rows = []
    with served(artifact) as (client, pid):
        for name, data in images.items():
            _post(client, data, postprocess.RenderOptions())
            for label, options in configurations():
                walls = []
                cpu0 = process_cpu_s(pid)
                for _ in range(reps):
                    t = time.perf_counter()
                    _post(client, data, options)
                    walls.append(time.perf_counter() - t)
                rows.append({"image": name, "config": label, "request_ms": _median_ms(walls),
                             "server_cpu_ms_per_request": round(1000 * (process_cpu_s(pid) - cpu0) / reps, 1)})
    return rows


def bench_throughput(artifact: Path, data: bytes, concurrency: int, requests: int) -> dict:
    """N concurrent single-image clients (RLE masks): images/s and server CPU ms per image."""
    options = postprocess.RenderOptions()
    with served(artifact) as (client, pid):
        _post(client, data, options)
        cpu0, t0 = process_cpu_s(pid), time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda _: _post(client, data, options), range(requests)))
        wall, cpu = time.perf_counter() - t0, process_cpu_s(pid) - cpu0
    return {"concurrency": concurrency, "requests": requests, "img_per_s": round(requests / wall, 2),
            "server_cpu_ms_per_image": round(1000 * cpu / requests, 1)}


def bench_thread_scaling(detector: Detector, data: bytes, n_images: int = 8) -> dict:
    """prepare() (decode + preprocess) of n images with 1 thread and with every CPU: images/s and
    process CPU seconds per wall second (above 1.0 only if the threads really ran at once, i.e.
    the GIL was released: a figure a busy shared machine cannot fake, only lower)."""
    out = {}
    for threads in sorted({1, cpu_workers()}):
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda _: detector.prepare(Upload("b.jpg", data), LIMITS), range(threads)))  # warm
            t0, c0 = time.perf_counter(), time.process_time()
            list(pool.map(lambda _: detector.prepare(Upload("b.jpg", data), LIMITS), range(n_images)))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        out[f"{threads}_threads"] = {"img_per_s": round(n_images / wall, 2), "cpu_per_wall": round(cpu / wall, 2)}
    return out


def _png_ms_kb(img: Image.Image, level: int, reps: int) -> tuple[float, float]:
    def save() -> bytes:
        buf = io.BytesIO()
        img.save(buf, "PNG", compress_level=level)
        return buf.getvalue()

    wall, _, data = timed(save, reps)
    return wall, round(len(data) / 1024, 1)


def bench_png_levels(detector: Detector, data: bytes, reps: int) -> list[dict]:
    """zlib level vs time and size for the mask PNG and the heatmap PNG (capped and full)."""
    prep = detector.prepare(Upload("b.jpg", data), LIMITS)
    policy = detector.policy()
    maps = postprocess.model_maps(detector.infer(prep.pixel_values[None], policy.allowed[None]), policy,
                                  prep.width, prep.height)
    mask = Image.fromarray(maps.full_classes())
    mask.putpalette(postprocess.palette())
    capped = postprocess.view_size(maps.width, maps.height, VIEW_MAX_SIDE)
    pictures = {"mask_full": mask,
                f"heatmap_{capped[0]}x{capped[1]}": Image.fromarray(postprocess.heatmap_u8(maps.full_anomaly(capped))),
                "heatmap_full": Image.fromarray(postprocess.heatmap_u8(maps.full_anomaly()))}
    rows = []
    for name, img in pictures.items():
        for level in (0, 1, 3, 6, 9):
            ms, kb = _png_ms_kb(img, level, reps)
            rows.append({"picture": name, "level": level, "ms": ms, "kb": kb})
    return rows


def bench_json(detector: Detector, images: dict[str, bytes], reps: int) -> list[dict]:
    """json.dumps (compact) vs orjson on real answers."""
    rows = []
    for name, data in images.items():
        for label, options in (("rle", postprocess.RenderOptions()),
                               ("rle+heatmap+overlay", postprocess.RenderOptions("rle", True, True,
                                                                                 view_max_side=VIEW_MAX_SIDE))):
            body = json.loads(service_work(detector, data, options)())
            std, _, _ = timed(lambda: json.dumps(body, separators=(",", ":")).encode("utf-8"), reps)
            fast, _, _ = timed(lambda: encode_json(body), reps)
            rows.append({"image": name, "answer": label, "json_ms": std, "orjson_ms": fast,
                         "kb": round(len(encode_json(body)) / 1024, 1)})
    return rows


def tile_for(width: int, height: int, n: int) -> int:
    """The tile side that cuts a width x height image into n x n tiles without overlap."""
    return -(-max(width, height) // n)


def bench_tiled(detector: Detector, data: bytes, n: int, reps: int) -> dict:
    """The image untiled vs as an n x n tiled product: CPU ms outside the encoder, per stage."""
    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
    tiles = Tiling(tile=tile_for(width, height, n))
    rows = []
    for label, options in (("rle", postprocess.RenderOptions()),
                           ("rle+heatmap+overlay", postprocess.RenderOptions("rle", True, True,
                                                                             view_max_side=VIEW_MAX_SIDE))):
        row: dict[str, Any] = {"config": label}
        for name, spec in (("untiled", None), (f"tiled_{n}x{n}", tiles)):
            work = service_work(detector, data, options, spec)
            work()
            _, cpu, _ = timed(work, reps)
            view = options.view_max_side if options.overlay else None
            _, prepare_cpu, prep = timed(lambda: detector.prepare(Upload("bench.jpg", data), LIMITS, view, tiles=spec),
                                         reps)
            row[name] = {"cpu_ms": cpu, "prepare_cpu_ms": prepare_cpu, "inputs": len(prep.inputs()),
                         "decode_ms": prep.decode_ms, "preprocess_ms": prep.preprocess_ms}
        tiled = row[f"tiled_{n}x{n}"]
        row["ratio_cpu"] = round(tiled["cpu_ms"] / row["untiled"]["cpu_ms"], 3)
        # the tiles' input alone (decode at the tiles' scale, cut and resample) against the whole
        # untiled request: the ratio no stitching or rendering work can bring the tiled one below
        row["floor_ratio_cpu"] = round(tiled["prepare_cpu_ms"] / row["untiled"]["cpu_ms"], 3)
        rows.append(row)
    return {"image": f"{width}x{height}", "tile": tiles.tile, "overlap": tiles.overlap, "rows": rows}


def machine_load() -> dict:
    """How busy the machine was: load averages and the CPUs this process may use."""
    one, five, fifteen = os.getloadavg()
    return {"loadavg_1_5_15": [round(one, 2), round(five, 2), round(fifteen, 2)], "cpus": cpu_workers()}


def bench_cpu_path(artifact: Path, options: CpuPathOptions) -> dict:
    """Every part above, in one run (ratios are only comparable within one run)."""
    detector = Detector.load(artifact, RuntimeOptions(providers=("CPUExecutionProvider",)))
    images = uploads(options)
    five_mp = images.get("5MP", next(iter(images.values())))
    out: dict[str, Any] = {"artifact": str(artifact), "image_size": detector.manifest.image_size,
                           "load_before": machine_load()}
    if options.tiles:
        out["tiled"] = bench_tiled(detector, five_mp, options.tiles, options.reps)
    if options.tiled_only:
        out["load_after"] = machine_load()
        return out
    out["stages"] = bench_stages(detector, images, options.reps)
    stage_5mp = next((r for r in out["stages"][1:] if r["config"] == "rle" and r["image"] == "5MP"), None)
    if stage_5mp is not None:
        out["projected_img_per_s_per_core"] = round(1000.0 / stage_5mp["service_cpu_ms"], 1)
    out["thread_scaling"] = bench_thread_scaling(detector, five_mp)
    out["png_levels"] = bench_png_levels(detector, five_mp, options.reps)
    out["json"] = bench_json(detector, images, options.reps)
    if options.http:
        out["http"] = bench_http(artifact, images, options.http_reps)
        out["throughput"] = bench_throughput(artifact, five_mp, options.concurrency, options.throughput_requests)
    out["load_after"] = machine_load()
    return out

