"""The published OpenAPI schema: FastAPI's, plus the request bodies the routes read themselves.

/detect, /v1/feedback and /v1/model/reload read their bodies after the key check (so an
unauthenticated caller learns nothing and the checks keep their order), which means FastAPI
never sees those bodies as parameters. The routes state them through `openapi_extra` as
references to named components; this module adds the components, so generated clients get
stable model names (`FeedbackIn`, `ReloadRequest`) instead of names made up from the
operation.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel


def component_ref(model: type[BaseModel]) -> dict[str, str]:
    """The `$ref` a route's `openapi_extra` uses for a request body model."""
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def install(app: FastAPI, request_models: list[type[BaseModel]]) -> None:
    """Publish `request_models` as components of the app's schema (built once, then cached)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in request_models:
                components.setdefault(model.__name__, model.model_json_schema(ref_template="#/components/schemas/{model}"))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
