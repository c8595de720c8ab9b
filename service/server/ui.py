"""The operator page: a single static HTML page (+ one JS and one CSS file) served by the app.

No build step, no CDN: the files live in `service/server/static/` and are shipped as package data.
The page talks to the same public API as any other client (`/v1/model`, `/detect`), so it
needs no special server support; it is served at `/` and `/ui`, its assets under `/ui/static/`,
and every URL in it is relative (it also works behind a path prefix). Only the files named in `_ASSETS` can be fetched (no path from the URL ever
reaches the file system).
"""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from service.server.errors import ApiError

STATIC_DIR = Path(__file__).with_name("static")
_ASSETS = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
# Everything the page needs comes from this origin; images are data: URLs built from the API's
# base64 PNGs, or blob: URLs of the file the operator dropped.
_CSP = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")
_HEADERS = {"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


@router.get("/")
@router.get("/ui")
async def page() -> Response:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/ui/static/{name}")
async def asset(name: str) -> Response:
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise ApiError(404, "not_found", f"no such asset: {name[:64]}")
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=_HEADERS)
